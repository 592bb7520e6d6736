"""The one entry point of a preprocessing run, ``preprocess(config) -> RunSummary`` (CLI, jobs and tests
call it). The work lives in one module per concept: :mod:`pipelines.plan` (start-up checks, lease, resume
plan), :mod:`pipelines.executors` (local process pool, Ray), :mod:`pipelines.driver` (scheduling, retries,
commit order) and :mod:`pipelines.summary` (what the run did)."""

from pipelines.driver import preprocess
from pipelines.executors import choose_executor, ray_cluster_available
from pipelines.summary import RunSummary

__all__ = ["RunSummary", "choose_executor", "preprocess", "ray_cluster_available"]
