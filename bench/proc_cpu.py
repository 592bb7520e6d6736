"""CPU seconds of a benchmarked run: every process it started, Ray's daemons and workers included (Linux).

Wall time on a shared 2-core machine swings with other people's load; CPU seconds per run barely do, so the
benchmarks report both. Two ways to count, because Ray's processes escape the usual one:

- :func:`children_cpu_s` (``RUSAGE_CHILDREN``) is exact for a run whose processes are all waited for by
  their parents: img2dataset, the local pool. :func:`become_subreaper` makes the benchmark adopt orphans
  (pool workers that outlive the driver for a moment) and :func:`reap_orphans` waits for them.
- Ray's raylet ignores ``SIGCHLD``, so its workers are reaped without their CPU time reaching anyone's
  ``RUSAGE_CHILDREN`` (measured: 4 of 9 CPU-s of a small Ray run arrived). :class:`CpuSampler` reads
  ``/proc`` for every process below the benchmark every ``every_s`` instead; a process that exits between
  two samples loses at most ``every_s`` of CPU, so it is a lower bound, close for long-lived processes.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ``prctl``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def children_cpu_s() -> float:
    """User + system seconds of every reaped descendant so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reap_orphans(keep: set[int], timeout_s: float = 60.0) -> None:
    """Wait for every child except ``keep`` (a server the benchmark runs) to exit, and reap it, so its CPU
    time lands in :func:`children_cpu_s`. Orphans adopted as subreaper exit on their own at shutdown."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            while True:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
        except ChildProcessError:
            return
        if not [p for p in _children(os.getpid()) if p not in keep]:
            return
        time.sleep(0.05)
    print(f"warning: processes of the run still alive after {timeout_s:.0f}s; CPU time incomplete",
          file=sys.stderr)


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, own CPU ticks, name, reaped children's CPU ticks) of a live or zombie process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    ppid = int(fields[1])
    own = int(fields[11]) + int(fields[12])
    reaped = int(fields[13]) + int(fields[14])
    return ppid, own, name, reaped


def _children(root: int) -> list[int]:
    return [pid for pid in _all_pids() if (st := _stat(pid)) is not None and st[0] == root]


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _tree(root: int, skip: set[int]) -> dict[int, tuple[int, int, str, int]]:
    stats = {pid: st for pid in _all_pids() if (st := _stat(pid)) is not None}
    kids: dict[int, list[int]] = {}
    for pid, st in stats.items():
        kids.setdefault(st[0], []).append(pid)
    out, todo = {}, [p for p in kids.get(root, []) if p not in skip]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid]
        todo += kids.get(pid, [])
    return out


def _label(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return name
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):  # Ray workers name themselves after what they run
        return first.split(" ")[0]
    if name.startswith("python") and len(argv) > 1:
        script = next((a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py")), None)
        if script:
            return os.path.basename(script)
    return name


class CpuSampler:
    """Samples the CPU seconds of each process below this one every ``every_s``, by process label (the
    last one seen: a Ray worker is ``ray::IDLE`` until it runs something). A process that exits between
    two samples loses at most ``every_s`` of CPU; the exact total comes from :func:`children_cpu_s`."""

    def __init__(self, skip: set[int] = frozenset(), every_s: float = 0.1):
        self.skip, self.every_s = set(skip), every_s
        self.seen: dict[int, tuple[str, float]] = {}
        self.base: dict[int, float] = {}  # CPU seconds at start_clock(), not counted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Take a last sample and stop counting (a clock that ends while the run's processes still live)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._sample()

    def _sample(self) -> None:
        for pid, (_, own, name, _) in _tree(os.getpid(), self.skip).items():
            label, prev = _label(pid, name), self.seen.get(pid)
            # idle again, or exiting (the kernel's 15-character name only): keep the label it had
            if prev is not None and (label == "ray::IDLE" or prev[0].startswith(label)):
                label = prev[0]
            self.seen[pid] = (label, own / _TICK)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def start_clock(self) -> None:
        """Count only what each process uses from now on."""
        self._sample()
        self.base = {pid: cpu for pid, (_, cpu) in self.seen.items()}

    def total_s(self) -> float:
        return sum(cpu - self.base.get(pid, 0.0) for pid, (_, cpu) in self.seen.items())

    def by_label(self) -> dict[str, tuple[int, float]]:
        """label -> (processes, CPU seconds), largest first."""
        agg: dict[str, list] = {}
        for pid, (label, cpu) in self.seen.items():
            a = agg.setdefault(label, [0, 0.0])
            a[0] += 1
            a[1] += cpu - self.base.get(pid, 0.0)
        return dict(sorted(((k, (v[0], v[1])) for k, v in agg.items()), key=lambda kv: -kv[1][1]))
