"""Execution back-ends of a preprocessing run: where shard tasks run (local process pool or Ray).

Each back-end offers ``submit(config_dict, task) -> handle``, ``wait(handles, timeout) -> done``,
``result(handle) -> stats``, ``cancel(handle)``, ``close()``, ``cpus`` and ``can_kill``; the driver
(:mod:`pipelines.driver`) schedules, retries and reports through that interface.
"""

from pipelines.executors.discovery import choose_executor, local_ray_started, ray_cluster_available

__all__ = ["choose_executor", "local_ray_started", "ray_cluster_available"]
