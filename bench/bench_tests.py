"""Wall time and CPU seconds of the slowest tests, one pytest process per test (issue 15s: CI time).

    python -m bench tests                                   # the default list below
    python -m bench tests tests/test_demo.py tests/train/test_tasks_learn.py

Wall time on a shared machine says little; CPU seconds say more. A test's Ray, SeaweedFS and ffmpeg processes
leave the pytest process tree (daemons, new sessions), so ``RUSAGE_CHILDREN`` misses most of them: where the
cgroup-v1 ``cpuacct`` hierarchy is writable (a container run as root), each test runs in a cgroup of its own and
the cgroup's total is reported; elsewhere the column says ``n/a``. The load average beside each row tells how
busy the machine was.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
DEFAULT = ["tests/test_demo.py", "tests/test_readme_commands.py", "tests/ops/test_jobs_e2e.py",
           "tests/train/test_tasks_learn.py"]


def _cgroup() -> Path | None:
    """A fresh cpuacct cgroup, or None where there is none to write."""
    group = CPUACCT / f"mplug2-bench-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        return group
    except OSError:
        return None


def run_one(target: str) -> tuple[int, float, float | None, str]:
    """Run ``pytest target`` in its own cgroup; (exit code, wall s, CPU s or None, load before/after)."""
    group = _cgroup()
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()

    def enter_group() -> None:     # in the child, before exec: it and all it starts count in the cgroup
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    rc = subprocess.call([sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", "-o",
                          "addopts="], preexec_fn=enter_group, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    cpu = int((group / "cpuacct.usage").read_text()) / 1e9 if group is not None else None
    if group is not None:
        try:
            group.rmdir()                 # fails while a straggler lives on; the next boot clears it
        except OSError:
            pass
    return rc, wall, cpu, f"{load0:.1f} / {os.getloadavg()[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench tests", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", default=DEFAULT, help="test files or node ids (default: the slowest)")
    args = p.parse_args(argv)
    print(f"{'test':60s} {'rc':>3s} {'wall s':>8s} {'CPU s':>8s}  load before / after")
    failed = []
    for target in args.targets:
        rc, wall, cpu, load = run_one(target)
        print(f"{target:60s} {rc:3d} {wall:8.1f} {'n/a' if cpu is None else f'{cpu:.1f}':>8s}  {load}", flush=True)
        if rc != 0:
            failed.append(target)
    if failed:   # a failing test's time is no measurement of it
        print(f"bench tests: {len(failed)} of {len(args.targets)} did not pass (rc column): {' '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
