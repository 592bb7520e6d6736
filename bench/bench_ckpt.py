"""Checkpoint cost on the training's critical path: a tiny run with a checkpoint every few steps, on S3 (an
embedded SeaweedFS on 127.0.0.1) or a local folder.

    python -m bench ckpt                                  # tiny, 24 steps, a checkpoint every 3, S3
    python -m bench ckpt --steps 48 --every 4 --repeat 3 --storage local

Per step, the interval between the ends of consecutive training steps: after a checkpoint step it holds the
checkpoint's snapshot and hand-off, and the next step, which runs while the checkpoint is written and uploaded.
Printed per run: the median interval after checkpoint steps and after the other steps and their ratio (issue
13: within 10 %), in wall time and in CPU time of the training thread (CPU time survives the load of a shared
machine), the time that thread was runnable but had no core, its wait for data (the loader's worker
shares the cores), and the time the hypervisor gave this VM's cores to others (steal: on a shared host, wall time
that none of the above explains); the snapshot's time on the step; the wait for the previous checkpoint; and the CPU each checkpoint
costs off the critical path, by process: the trainer's other threads (upload, log sync, TensorBoard), the
writer process, the S3 server (which shares this machine's cores here; on a cluster it is elsewhere). With
``--repeat`` a last line gives the median ratio over the runs; a second table splits the trainer's other
threads' CPU by kind (Python thread name, or a native thread's OS name). The 1-minute load average is printed per run.
``--s3-nice 19`` runs the S3 server below everything else, ``--s3-cores 1`` on one core at a time: stand-ins
for an S3 that is not on these cores. ``--snapshot-only`` takes each snapshot and drops it (no write, no upload):
the part of the ratio the snapshot and its copy leave; ``--no-checkpoint`` takes none (the ratio of the same
intervals with nothing between them: this machine's noise floor). ``--keep-last N`` with N at least the
checkpoints taken deletes none (each background job otherwise first deletes the checkpoint that falls out of the
newest 2). ``--components`` measures a checkpoint's parts one by one. ``python -m bench interference`` shows
what work on the other core does to the training step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mplug2.runtime import setup_process_env  # noqa: E402

setup_process_env()

_TICK = os.sysconf("SC_CLK_TCK")


def _runqueue_wait_s() -> float:
    """Seconds this thread has waited for a core (runnable, not running) since it started (schedstat)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def _steal_s() -> float:
    """Seconds the hypervisor ran something else while this VM's vCPUs wanted to run (all vCPUs, since boot;
    ``/proc/stat``'s steal column, in clock ticks): wall time no thread of this machine is charged for."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / _TICK


def _cpu_s(stat_path: str) -> float | None:
    """utime + stime of a process or thread from ``/proc/.../stat`` (None once it is gone)."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def _thread_comm(pid: int, tid: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f"native: {f.read().strip()}"
    except OSError:
        return "?"


def _tiny_loop(args: argparse.Namespace, scratch: Path, storage_url: str, *, run_name: str, total_steps: int,
               every: int, device: str = "cpu", hooks=None):
    """The benchmark's training run: the ``--preset`` model pretraining on four small image shards."""
    import torch

    from mplug2.train.config import TrainConfig
    from mplug2.train.hooks import LocalHooks
    from mplug2.train.loop import TrainLoop
    from tests.data.shards_fixture import write_shards

    shards = str(scratch / "images")
    write_shards(shards, [64] * 4, size=(40, 36))
    cfg = TrainConfig.from_dict(dict(
        run_name=run_name, storage=storage_url, task="pretrain", seed=0,
        model={"preset": args.preset, "queue_size": 16, "tokenizer": "bert-base-uncased",
               "text": {"vocab_size": 30522}},     # captions differ by digits, which tiny maps to [UNK]
        data=dict(train=[dict(name="images", path=shards, num_frames=1)], batch_size=args.batch_size,
                  shuffle_buffer=16, shards_in_flight=2, max_text_len=12),
        optim=dict(warmup_steps=1),
        schedule=dict(total_steps=total_steps, ckpt_every_steps=every, log_every_steps=1000,
                      keep_last=getattr(args, "keep_last", 2)),
        scale=dict(num_workers=1)))
    return TrainLoop(cfg, rank=0, world_size=1, device=torch.device(device),
                     hooks=hooks(cfg) if hooks is not None else LocalHooks(cfg, 0))


class _SnapshotOnlyHooks:
    """``--snapshot-only``: each checkpoint is taken (the snapshot and its copy beside the next step) and then
    dropped: no write, no upload. What is left of a checkpoint's cost on the step without them."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def report(self, metrics, checkpoint, step) -> None:
        if checkpoint is not None:
            checkpoint.wait_staged()
            checkpoint.written_cpu_s = 0.0
            shutil.rmtree(checkpoint.directory, ignore_errors=True)

    def wait_for_upload(self, block: bool = True) -> None:
        pass

    def upload_in_flight(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def resume_from(self) -> None:
        return None


@dataclass
class CpuSampler:
    """CPU seconds since :meth:`start` of the trainer's threads other than the training thread, the checkpoint
    writer process (start-up included) and the S3 server, sampled every ``period_s`` (a process that ended keeps
    its last reading). What ran before :meth:`start` (the S3 clients' set-up, ~0.4 s once) is not counted."""

    writer_pid: Callable[[], int | None]
    server_pid: int | None
    period_s: float = 0.02
    seen: dict[tuple[str, int], float] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)       # trainer thread id -> what it is

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)
        self._main, self._own = threading.get_native_id(), None
        self._base: dict[tuple[str, int], float] = {}

    def start(self) -> None:
        self._sample()
        self._base = dict(self.seen)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        out = {"trainer_threads": 0.0, "writer": 0.0, "s3_server": 0.0}
        for (role, _), cpu in self.seen.items():
            out[role] += cpu
        return out

    def by_thread(self) -> dict[str, float]:
        """The trainer's other threads' CPU seconds by thread kind (Python thread name without its step label,
        or the OS name of a native thread: pyarrow's and the AWS SDK's)."""
        out: dict[str, float] = {}
        for (role, tid), cpu in self.seen.items():
            if role == "trainer_threads":
                name = self.names.get(tid, "?")
                out[name] = out.get(name, 0.0) + cpu
        return out

    def _run(self) -> None:
        self._own = threading.get_native_id()
        while not self._stop.wait(self.period_s):
            self._sample()

    def _sample(self) -> None:
        pid = os.getpid()
        python_names = {t.native_id: t.name.split("-step_")[0] for t in threading.enumerate()}
        for tid in os.listdir(f"/proc/{pid}/task"):
            if int(tid) not in (self._main, self._own):
                self._read("trainer_threads", int(tid), f"/proc/{pid}/task/{tid}/stat")
                if int(tid) not in self.names:
                    self.names[int(tid)] = python_names.get(int(tid)) or _thread_comm(pid, tid)
        writer = self.writer_pid()
        if writer is not None:
            self._read("writer", writer, f"/proc/{writer}/stat")
        if self.server_pid is not None:
            self._read("s3_server", self.server_pid, f"/proc/{self.server_pid}/stat")

    def _read(self, role: str, ident: int, path: str) -> None:
        cpu = _cpu_s(path)
        if cpu is not None:
            self.seen[(role, ident)] = cpu - self._base.get((role, ident), 0.0)


def run_once(args: argparse.Namespace) -> dict[str, float]:
    from mplug2.s3server import S3Server
    from mplug2.train.loop import _run_or_abort

    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    server = S3Server(root=scratch / "s3", buckets=("bench",), max_cores=args.s3_cores or None) \
        if args.storage == "s3" else None
    if server is not None:
        server.start()
        if args.s3_nice:
            os.setpriority(os.PRIO_PROCESS, server.pid, args.s3_nice)
    try:
        if server is not None:
            os.environ.update(server.env())
        loop = _tiny_loop(args, scratch, "s3://bench/runs" if server is not None else str(scratch / "runs"),
                          run_name="ckpt", total_steps=args.steps, every=args.every, device=args.device,
                          hooks=_SnapshotOnlyHooks if args.snapshot_only else None)
        ends: list[tuple[float, ...]] = []        # (step, wall, thread CPU, runqueue wait, data wait so far,
        data_wait = [0.0]                           # hypervisor steal so far) at step ends
        snapshots: list[tuple[float, float]] = []           # (wait, snapshot) seconds per checkpoint
        taken = []                                          # the checkpoints' snapshots (their write's CPU)
        train_step, save = loop.train_step, loop.save
        if args.no_checkpoint:            # the same intervals, nothing done between them: the ratio's own floor
            def save(metrics: dict[str, float]) -> dict[str, float]:
                return {"ckpt_wait_s": 0.0, "ckpt_snapshot_s": 0.0, "ckpt_background_s": 0.0}

        def timed_step():
            out = train_step()                # its loss values are read on the host: the step has ended
            data_wait[0] += out[1].data_wait_s
            ends.append((loop.step, time.perf_counter(), time.thread_time(), _runqueue_wait_s(), data_wait[0],
                         _steal_s()))
            return out

        def timed_save(metrics):
            times = save(metrics)
            snapshots.append((times["ckpt_wait_s"], times["ckpt_snapshot_s"]))
            if loop._last_ckpt is not None:
                taken.append(loop._last_ckpt)
            return times

        loop.train_step, loop.save = timed_step, timed_save
        sampler = CpuSampler(writer_pid=lambda: loop._writer.pid, server_pid=server.pid if server else None)
        load0 = os.getloadavg()[0]
        sampler.start()
        _run_or_abort(loop)
        cpu = sampler.stop()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    intervals: dict[str, list[float]] = {f"{m}_{k}": [] for m in ("wall", "cpu", "rq", "data", "steal")
                                         for k in ("ckpt", "other")}
    for (step, w0, c0, q0, d0, s0), (_, w1, c1, q1, d1, s1) in zip(ends[1:], ends[2:]):   # the first: start-up, FLOP count
        kind = "ckpt" if step % args.every == 0 else "other"
        intervals[f"wall_{kind}"].append(w1 - w0)
        intervals[f"cpu_{kind}"].append(c1 - c0)
        intervals[f"rq_{kind}"].append(q1 - q0)
        intervals[f"data_{kind}"].append(d1 - d0)
        intervals[f"steal_{kind}"].append(s1 - s0)
    n_ckpt = len(snapshots)
    # steal comes in whole clock ticks (10 ms): its mean per interval, the others' medians
    med = {k: 1000 * (statistics.mean if k.startswith("steal") else statistics.median)(v)
           for k, v in intervals.items()}
    return {**med, "ratio": med["wall_ckpt"] / med["wall_other"], "cpu_ratio": med["cpu_ckpt"] / med["cpu_other"],
            "snapshot": 1000 * statistics.median(s for _, s in snapshots),
            "wait": 1000 * statistics.median(w for w, _ in snapshots),
            **{f"bg_{k}": 1000 * v / n_ckpt for k, v in cpu.items()}, "checkpoints": n_ckpt,
            "threads": {k: 1000 * v / n_ckpt for k, v in sampler.by_thread().items()},
            # the writer's own CPU per write (its process's start-up, importing torch, is not a checkpoint's)
            "bg_writer": 1000 * statistics.median([s.written_cpu_s for s in taken if s.written_cpu_s is not None]
                                                  or [0.0]),
            "load": max(load0, os.getloadavg()[0])}


def components(args: argparse.Namespace, repeats: int = 6) -> None:
    """CPU per checkpoint, part by part, each measured alone (median of ``repeats``, after one warm-up) on the
    tiny model after two training steps: where the milliseconds of the runs above go."""
    import hashlib

    from mplug2.s3server import S3Server
    from mplug2.train.checkpoint import StagingBuffers, prune_checkpoints, take_snapshot, upload_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-parts-"))
    server = S3Server(root=scratch / "s3", buckets=("bench",))
    server.start()
    parts: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        parts.setdefault(name, []).append(seconds)

    try:
        os.environ.update(server.env())
        loop = _tiny_loop(args, scratch, "s3://bench/runs", run_name="parts", total_steps=100, every=1000)
        for _ in range(3):
            c0 = time.thread_time()
            loop.train_step()
            add("training step (for scale)", time.thread_time() - c0)
        buffers = StagingBuffers(shared=True)
        size = 0
        for i in range(repeats + 1):
            local = tempfile.mkdtemp(prefix="bench-ckpt-part-", dir=scratch)
            c0 = time.thread_time()
            snap = take_snapshot(local, model=loop.task, optimizer=loop.optimizer, scheduler=loop.scheduler,
                                 step=i, extra={}, rank=0, world_size=1, data_state=loop.loader.state_dict(),
                                 config_fingerprint="bench", buffers=buffers, write_manifest=True)
            add("snapshot (training thread)", time.thread_time() - c0)
            c0 = time.thread_time()                          # the training loop's way: the copy beside the step
            take_snapshot(local, model=loop.task, optimizer=loop.optimizer, scheduler=loop.scheduler, step=i,
                          extra={}, rank=0, world_size=1, data_state=loop.loader.state_dict(),
                          config_fingerprint="bench", buffers=buffers, write_manifest=True,
                          overlap=True).wait_staged()
            add("  the same, weights' copy in a thread (`overlap`; training thread)", time.thread_time() - c0)
            snap.durable = False
            snap.write_here()
            add("write: serialise + write the files (writer)", snap.written_cpu_s)
            names = sorted(os.listdir(local))
            size = sum(os.path.getsize(os.path.join(local, n)) for n in names)
            c0 = time.thread_time()
            for n in names:                                  # what botocore does over http (not https)
                with open(os.path.join(local, n), "rb") as f:
                    hashlib.sha256(f.read()).hexdigest()
            add("  of the upload: sha256 of the payload (http only)", time.thread_time() - c0)
            dest = f"s3://bench/runs/parts/step_{i:08d}"
            s0, c0 = _cpu_s(f"/proc/{server.pid}/stat"), time.process_time()
            upload_checkpoint(local, dest)
            add("upload, S3 client (trainer's threads)", time.process_time() - c0)
            add("upload, S3 server (SeaweedFS, this machine)", _cpu_s(f"/proc/{server.pid}/stat") - s0)
            s0, c0 = _cpu_s(f"/proc/{server.pid}/stat"), time.process_time()
            prune_checkpoints("s3://bench/runs/parts", 2, below_step=i)
            add("prune: list + delete the oldest (client)", time.process_time() - c0)
            add("prune (S3 server)", _cpu_s(f"/proc/{server.pid}/stat") - s0)
            c0 = time.process_time()
            upload_checkpoint(local, str(scratch / "local" / f"step_{i:08d}"))
            add("copy to a local destination (fsync)", time.process_time() - c0)
            shutil.rmtree(local)
        loop.close()
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"CPU per checkpoint by part, measured alone ({args.preset}, {size / 2**20:.1f} MiB per checkpoint; "
          f"median of {repeats}; load {os.getloadavg()[0]:.1f}):\n")
    print("| part | CPU (ms) |\n|---|---|")
    for name, values in parts.items():
        values = values[1:] if len(values) > 2 else values       # the first of each: warm-up
        print(f"| {name} | {1000 * statistics.median(values):.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--storage", choices=("s3", "local"), default="s3",
                    help="s3: SeaweedFS on 127.0.0.1 (its server shares this machine's CPUs); local: a folder")
    ap.add_argument("--s3-nice", type=int, default=0, help="niceness of the S3 server (19: below everything)")
    ap.add_argument("--s3-cores", type=int, default=0,
                    help="cores the S3 server's Go code may run on at once (GOMAXPROCS; 0: all)")
    ap.add_argument("--keep-last", type=int, default=2,
                    help="checkpoints kept: each checkpoint's background job first deletes those past it (at least "
                         "the number taken: nothing deleted, to see what the deletion costs)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (staging buffers pinned, copies not waited for)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, one row each, then the median ratio")
    ap.add_argument("--components", action="store_true",
                    help="instead: CPU per checkpoint part by part (snapshot, write, upload client / server, prune)")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--no-checkpoint", action="store_true",
                      help="take no checkpoint at all: the ratio's floor (the same intervals, nothing between them)")
    only.add_argument("--snapshot-only", action="store_true",
                      help="take each checkpoint's snapshot, then drop it: no write, no upload")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.components:
        components(args)
        return 0
    if args.every < 1:
        ap.error("--every must be at least 1")
    if args.keep_last < 1:
        ap.error("--keep-last must be at least 1 (a number at least the checkpoints taken deletes none)")
    if args.steps < 2 * args.every + 2:
        ap.error(f"--steps {args.steps} leaves fewer than two checkpoint intervals at --every {args.every}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("| storage | steps | every | median step, other (ms) | median step, checkpoint (ms) | ratio | training "
          "thread CPU, other / checkpoint (ms) | CPU ratio | waiting for a core, other / checkpoint (ms) | waiting for data, other / checkpoint (ms) | hypervisor steal, other / checkpoint (ms, mean) | snapshot (ms) | wait for the previous (ms) | CPU per "
          "checkpoint off the step: trainer threads / writer / S3 server (ms) | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios, cpu_ratios, threads = [], [], []
    for _ in range(args.repeat):
        r = run_once(args)
        threads.append(r["threads"])
        ratios.append(r["ratio"])
        cpu_ratios.append(r["cpu_ratio"])
        server = f"{r['bg_s3_server']:.0f}" if args.storage == "s3" else "—"
        mode = " (no checkpoint)" if args.no_checkpoint else " (snapshot only)" if args.snapshot_only else ""
        print(f"| {args.storage}{mode}"
              f"{f' (nice {args.s3_nice})' if args.s3_nice else ''}"
              f"{f' ({args.s3_cores} core)' if args.s3_cores and args.storage == 's3' else ''}"
              f"{f' (keep {args.keep_last})' if args.keep_last != 2 else ''}"
              f"{f', {args.preset} on {args.device}' if args.device != 'cpu' or args.preset != 'tiny' else ''} | {args.steps} | {args.every} | "
              f"{r['wall_other']:.0f} | {r['wall_ckpt']:.0f} | {r['ratio']:.2f} | {r['cpu_other']:.0f} / "
              f"{r['cpu_ckpt']:.0f} | {r['cpu_ratio']:.2f} | {r['rq_other']:.0f} / {r['rq_ckpt']:.0f} | {r['data_other']:.0f} / {r['data_ckpt']:.0f} | {r['steal_other']:.0f} / {r['steal_ckpt']:.0f} | {r['snapshot']:.1f} | {r['wait']:.1f} | "
              f"{r['bg_trainer_threads']:.0f} / {r['bg_writer']:.0f} / {server} | {r['load']:.1f} |", flush=True)
    kinds = sorted({k for t in threads for k in t}, key=lambda k: -statistics.median(t.get(k, 0.0) for t in threads))
    print("\nThe trainer's other threads, CPU per checkpoint (ms; median over the runs; they run whether or not a "
          "checkpoint is taken):\n\n| thread | CPU (ms) |\n|---|---|")
    for k in kinds:
        print(f"| {k} | {statistics.median(t.get(k, 0.0) for t in threads):.1f} |")
    if args.repeat > 1:
        print(f"\nmedian over {args.repeat} runs: ratio {statistics.median(ratios):.2f} (wall), "
              f"{statistics.median(cpu_ratios):.2f} (training-thread CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
