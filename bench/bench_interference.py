"""What work on the machine's other core does to a training step that has a core of its own.

    python -m bench interference                     # tiny, batch 8: 3 rounds of 12 steps per neighbour

A checkpoint taken "off the critical path" still runs somewhere: its staging copy in a thread, its serialisation in
the writer process, its upload's file writes. On a machine with as many cores as busy threads that work does not
take the training thread's core, but it shares the memory system (caches, bandwidth) and, on a VM, the host. This
pins the training thread to core 0 and one process to core 1 doing, in turn: nothing, a Python loop, 40 MiB memory
copies, 40 MiB file writes and deletes; and prints the training thread's CPU per step beside each (CPU time, so
time spent waiting for a core is not counted: a slower step here is the same work done slower). Rounds alternate
the neighbours so that a drift of the host is spread over all of them. Issue 13's checkpoint ratio
(``python -m bench ckpt``) cannot fall below what this shows for the work a checkpoint does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_ckpt import _steal_s, _tiny_loop

_NEIGHBOURS = ("nothing", "Python loop", "memcpy 40 MiB", "write + delete 40 MiB files")


def _neighbour(kind: str, folder: str, ready, stop) -> None:
    """One kind of work, repeated on core 1 until ``stop``."""
    import numpy as np

    os.sched_setaffinity(0, {1})
    src = np.ones(40 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    ready.set()
    n = 0
    while not stop.is_set():
        if kind == "Python loop":
            x = 0
            for _ in range(100_000):
                x += 1
        elif kind == "memcpy 40 MiB":
            np.copyto(dst, src)
        else:
            path = os.path.join(folder, f"neighbour{n % 3}")
            with open(path, "wb") as f:
                f.write(src.data)
            n += 1
            if n % 3 == 0:
                for k in range(3):
                    os.remove(os.path.join(folder, f"neighbour{k}"))


def interference(args: argparse.Namespace) -> None:
    """The training thread's CPU per step (no checkpoints) pinned to core 0, alone and beside one process on
    core 1 doing what a checkpoint's background work does (a Python loop; memory copies; file writes): how much a
    step slows from work that shares the machine's memory system but none of its cores. Rounds alternate."""
    import multiprocessing

    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("python -m bench interference needs CPUs 0 and 1 (os.sched_getaffinity)")
    rounds, steps = args.rounds, args.steps
    ctx = multiprocessing.get_context("spawn")
    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-interference-"))
    cpu: dict[str, list[float]] = {kind: [] for kind in _NEIGHBOURS}
    steal: dict[str, list[float]] = {kind: [] for kind in _NEIGHBOURS}
    loop = None
    try:
        os.sched_setaffinity(0, {0})         # the loader's worker inherits it: core 1 is the neighbour's alone
        loop = _tiny_loop(args, scratch, str(scratch / "runs"), run_name="interference", total_steps=10_000,
                          every=10_000)
        for _ in range(12):                                  # warm-up (and the FLOP count of the first)
            loop.train_step()
        for _ in range(rounds):
            for kind in _NEIGHBOURS:
                ready, stop, process = ctx.Event(), ctx.Event(), None
                if kind != "nothing":
                    process = ctx.Process(target=_neighbour, args=(kind, str(scratch), ready, stop), daemon=True)
                    process.start()
                    ready.wait()
                per_step, s0 = [], _steal_s()
                for _ in range(steps):
                    c0 = time.thread_time()
                    loop.train_step()
                    per_step.append(time.thread_time() - c0)
                steal[kind].append(1000 * (_steal_s() - s0) / steps)
                if process is not None:
                    stop.set()
                    process.join()
                cpu[kind].append(1000 * statistics.median(per_step))
    finally:
        if loop is not None:
            loop.close()
        os.sched_setaffinity(0, {0, 1})
        shutil.rmtree(scratch, ignore_errors=True)
    alone = statistics.median(cpu["nothing"])
    print(f"Training-thread CPU per step on core 0 ({args.preset}, batch {args.batch_size}; median of {steps} steps "
          f"per round, {rounds} rounds; load {os.getloadavg()[0]:.1f}):\n")
    print("| on core 1 | CPU per step, by round (ms) | median / alone | hypervisor steal per step, mean (ms) |\n"
          "|---|---|---|---|")
    for kind, values in cpu.items():
        print(f"| {kind} | {' / '.join(f'{v:.1f}' for v in values)} | {statistics.median(values) / alone:.2f} | "
              f"{statistics.mean(steal[kind]):.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the neighbours")
    ap.add_argument("--steps", type=int, default=12, help="training steps per neighbour and round")
    args = ap.parse_args(argv)
    if min(args.rounds, args.steps, args.batch_size) < 1:
        ap.error("--rounds, --steps and --batch-size must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    interference(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
