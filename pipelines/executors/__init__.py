"""Execution back-ends of a preprocessing run: where shards are processed.

- :mod:`~pipelines.executors.local`: a process pool, one task per shard (``submit`` / ``wait`` / ``result`` /
  ``cancel``), scheduled by :func:`pipelines.driver._drive_pool`;
- :mod:`~pipelines.executors.ray_data`: a Ray Data pipeline of stages fed windows of shards (``run``), driven
  by :func:`pipelines.driver._drive_stream`;
- :mod:`~pipelines.executors.discovery`: which of the two ``--executor auto`` picks, without importing Ray.
"""

from pipelines.executors.discovery import choose_executor, local_ray_started, ray_cluster_available

__all__ = ["choose_executor", "local_ray_started", "ray_cluster_available"]
