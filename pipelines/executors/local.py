"""The local back-end: a process pool on this machine, no Ray (``--executor local``, or ``auto`` without a cluster)."""

from __future__ import annotations

import os

from pipelines.config import PreprocessConfig
from pipelines.shard_task import ShardTask, run_shard, warm_up, worker_init


class LocalExecutor:
    """Processes on this machine, no Ray (``auto`` picks it when there is no Ray cluster to use): spawned
    workers, one shard task each at a time."""

    can_kill = False  # a running pool task cannot be stopped, so a timed-out shard is reported, not retried

    def __init__(self, config: PreprocessConfig):
        import concurrent.futures as cf
        import multiprocessing as mp

        self.cf = cf
        self.cpus = config.num_cpus or os.cpu_count() or 1
        self.pool = cf.ProcessPoolExecutor(self.cpus, mp_context=mp.get_context("spawn"), initializer=worker_init)
        # Start every worker now: interpreter start-up and imports (~0.5 s each, more on a busy machine)
        # overlap the driver's start-up checks and planning instead of delaying the first shard.
        self._warm = [self.pool.submit(warm_up) for _ in range(self.cpus)]

    def submit(self, config_dict: dict, task: ShardTask):
        return self.pool.submit(run_shard, config_dict, task)

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = self.cf.wait(handles, timeout=timeout, return_when=self.cf.FIRST_COMPLETED)
        return list(done)

    def result(self, handle) -> dict:
        return handle.result()

    def cancel(self, handle) -> None:
        handle.cancel()  # a running local task cannot be interrupted; its result is ignored

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
