"""The Ray back-end: one Ray core task per shard (the whole shard's work in one task)."""

from __future__ import annotations

import os

from pipelines.config import PreprocessConfig
from pipelines.executors.discovery import local_ray_started
from pipelines.shard_task import ShardTask, run_shard


class RayTaskExecutor:
    """One Ray task per shard, 1 CPU each, no Ray-level retries (the driver retries and reports)."""

    can_kill = True  # ray.cancel(force=True) kills the worker: a timed-out shard can be retried safely

    def __init__(self, config: PreprocessConfig):
        import ray

        from mplug2.runtime import init_ray

        self.ray = ray
        self.started = not ray.is_initialized() and not (config.ray_address or os.environ.get("RAY_ADDRESS"))
        # A cluster this run starts for itself lives as long as the run: no dashboard (it costs ~1 s of
        # start-up, measured 2.7-4.5 s vs 3.4-5.8 s for ray.init on 2 busy cores); `ray start` gives one.
        extra = {"include_dashboard": False} if self.started and not local_ray_started() else {}
        init_ray(config.ray_address, num_cpus=config.num_cpus, log_to_driver=True, **extra)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.remote = ray.remote(num_cpus=config.task_cpus, max_retries=0)(run_shard)

    def submit(self, config_dict: dict, task: ShardTask):
        return self.remote.remote(config_dict, task)

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if done:  # collect everything already finished, not just one
            more, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
            done = list({id(h): h for h in done + more}.values())
        return done

    def result(self, handle) -> dict:
        return self.ray.get(handle)

    def cancel(self, handle) -> None:
        self.ray.cancel(handle, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
