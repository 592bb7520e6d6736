"""Side threads that run torch ops beside a busy training or inference thread, without slowing it down.

PyTorch's CPU ops run on OpenMP (libgomp in the PyPI wheels), and each Python thread that calls a parallel op
gets an OpenMP team of its own, ``torch.get_num_threads()`` threads strong. Once libgomp manages more threads
than the machine has cores it stops spin-waiting at its barriers, for every team in the process: each
parallel region of the main thread then puts its workers to sleep on a futex and wakes them again. Measured on
the 2-core CI machine (docs/benchmarks.md, stop 28): once the checkpoint's background copy had run, every step
of the tiny model's training took ~130 ms instead of ~75 ms, with ~690 futex sleeps per step instead of none.

A side thread's work (a batched memcpy, resizing a few frames) gains little from a team of its own, so
:func:`single_threaded_torch` gives it none. It limits the calling thread only (threadpoolctl sets OpenMP's
per-thread ``nthreads`` value); ``torch.set_num_threads`` would also change the default of every thread started
afterwards.
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits

__all__ = ["single_threaded_torch"]


def single_threaded_torch() -> None:
    """Run the calling thread's torch CPU ops on this thread alone, with no OpenMP team; other threads keep
    theirs. Call it first thing in a side thread. A no-op where torch has no OpenMP runtime."""
    # torch sets a thread's OpenMP thread count lazily, at the thread's first call that asks for it; that call
    # comes first here, or it would undo the limit below at the first parallel op.
    torch.get_num_threads()
    threadpool_limits(1, user_api="openmp")
