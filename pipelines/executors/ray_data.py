"""The Ray back-end: shards stream through a Ray Data pipeline of named stages with their own resources.

    planned shards → fetch (I/O: threads, a fraction of a CPU) → decode (CPU) → [score] → [caption]
    (model actor pools, GPUs where the cluster has them) → commit (tar, parquet, ``_stats.json`` last)

An image corpus fetches and decodes in one stage (``fetch_decode``: download threads
feed CPU threads inside the task, as in the local pool), so its fetched bytes never enter the object store.
Without model stages all stages run in one map at the shard's CPUs (one task per shard, the shard handed
from stage to stage in memory, Ray itself queues the shards); model stages split the pipeline into
operators with their own resources, and the stages around them take the shares below.

One Ray Data row is one whole shard (:class:`~pipelines.shard_stages.ShardWork`, pickled): the commit stage
sees all rows of its shard, so shard membership, bytes and the commit order are those of the local pool.
The driver feeds shards in windows (a Dataset each) so that planning stays streamed and a failed shard
can be retried in a later window; Ray Data's own progress bars show each stage, and its statistics give
the per-stage summary (:attr:`pipelines.summary.RunSummary.stages`).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import threading
from typing import Callable, Iterator

from pipelines import shard_stages
from pipelines.config import PreprocessConfig
from pipelines.executors.discovery import local_ray_started
from pipelines.shard_stages import ShardWork

log = logging.getLogger(__name__)

# With model stages, a shard's `task_cpus` are split between its stages: Ray reserves logical CPUs, so with
# 1 CPU per decode task and 0.25 for each I/O task, two decode tasks could not run beside a fetch and a commit
# on 2 cores and the CPU stage ran at half width (10k-image benchmark: 178 s vs 105 s with 0.75 for decode).
DECODE_SHARE = 0.75  # decode, sample, resize, encode: the CPU stage
IO_SHARE = 0.25  # fetch (mostly waiting on the network) and commit (tar, upload) each
# Images fetch and decode in one stage. Ray Data's resource allocator reserves half of the cluster's CPUs
# split evenly between the operators and shares the rest, so beside commit this stage's budget is about
# half the CPUs: at 0.75 CPU a task it ran one shard at a time on 2 CPUs (stage summary: task s = wall s),
# at 0.5 one shard per CPU, as the local pool does (task s = 1.7 x wall s on 2 busy cores).
FETCH_DECODE_SHARE = 0.5


def _stage_fn(stages: list[Callable], config_dict: dict) -> Callable[[dict], dict]:
    """One Ray Data map over a row (a pickled shard) that applies ``stages`` in turn."""
    def apply(row: dict) -> dict:
        return {"work": shard_stages.run_stages(stages, config_dict, row["work"])}

    # Ray Data names the operator after it: Map(fetch), Map(decode)..., Map(fetch_decode->commit)
    apply.__name__ = "->".join(s.__name__ for s in stages)
    return apply


class RayDataExecutor:
    """Connects to (or starts) Ray and runs windows of shards through the stage pipeline."""

    def __init__(self, config: PreprocessConfig):
        import ray

        from mplug2.runtime import init_ray

        self.ray = ray
        self.started = not ray.is_initialized() and not (config.ray_address or os.environ.get("RAY_ADDRESS"))
        # A cluster this run starts for itself lives as long as the run: no dashboard (it costs ~1 s of
        # start-up, measured 2.7-4.5 s vs 3.4-5.8 s for ray.init on 2 busy cores); `ray start` gives one.
        extra = {"include_dashboard": False} if self.started and not local_ray_started() else {}
        init_ray(config.ray_address, num_cpus=config.num_cpus, log_to_driver=True, **extra)
        resources = ray.cluster_resources()
        self.cpus = max(1, int(resources.get("CPU", 1)))
        self.gpus = float(resources.get("GPU", 0))
        self.config = config
        self.stages: dict[str, dict] = {}  # operator -> rows, task seconds, wall seconds (over all windows)
        self.stage_task_s: dict[str, dict] = {}  # stage -> shards, seconds (measured in the stage itself)

    # ------------------------------------------------------------------ the pipeline
    def _dataset(self, works: list[ShardWork]):
        import ray.data

        c, cd = self.config, self.config.to_dict()
        items = [{"work": pickle.dumps(w, protocol=5)} for w in works]
        ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block (and task) per shard
        ctx = ds.context  # this Dataset's own copy of the caller's DataContext: the caller's stays as it is
        ctx.enable_progress_bars = bool(c.progress)
        ctx.enable_operator_progress_bars = bool(c.progress)
        ctx.verbose_stats_logs = False
        if c.modality == "image":  # the fetched bytes (~60 MB per 1,000-image shard) never cross the object store
            stages = [(shard_stages.fetch_decode, FETCH_DECODE_SHARE)]
        else:  # video rows fetch (or hash a local file) on a few threads, then decode clip by clip
            stages = [(shard_stages.fetch, IO_SHARE), (shard_stages.decode, DECODE_SHARE)]
        if not c.has_model_stages:
            # Every stage in one task per shard at the shard's CPUs, as in the local pool: Map(fetch_decode->
            # commit). The samples never cross the object store, and no task waits on another operator's slot
            # or budget (with split shares, 10 video shards took 58.9 s in Ray Data against 21.1 s for the
            # whole local-pool run, same load). One map for all stages rather than Ray Data's fusion of one
            # map per stage, which pickled the shard and copied it through an Arrow block between stages
            # (~0.1 CPU-s per 1,000-image shard). One operator has nothing to share resources with, and
            # Ray Data's per-operator budget cost CPUs here: it is zero until the autoscaling coordinator's
            # first answer (refreshed once a second), so the second shard started 1-2 s after the first, and
            # the executor's 0.1 s polling left a CPU idle 0.1-0.2 s between shards (`ray.timeline()`,
            # 10k-image benchmark). Without it the window's shards queue in Ray itself, which starts each as
            # a CPU frees up.
            ctx.op_resource_reservation_enabled = False
            return ds.map(_stage_fn([stage for stage, _ in stages] + [shard_stages.commit], cd),
                          num_cpus=c.task_cpus)
        for stage, share in stages:
            ds = ds.map(_stage_fn([stage], cd), num_cpus=share * c.task_cpus)
        from pipelines.model_stages import add_model_stages

        ds = add_model_stages(ds, c, cpus_in_cluster=self.cpus, gpus_in_cluster=self.gpus)
        return ds.map(_stage_fn([shard_stages.commit], cd), num_cpus=IO_SHARE * c.task_cpus)

    def stage_summary(self) -> dict[str, dict]:
        """Per operator: shards, task and wall seconds; an operator of several stages (``Map(a->b)``, one map,
        or ``Map(a)->Map(b)``, fused by Ray Data) also carries the task seconds each stage measured itself,
        under ``stages``."""
        out = {name: dict(op) for name, op in self.stages.items()}
        for name, op in out.items():
            if "->" in name:
                op["stages"] = {s: self.stage_task_s[s] for s in re.findall(r"\w+", name)
                                if s != "Map" and s in self.stage_task_s}
        return out

    def run(self, works: list[ShardWork], tick: Callable[[], None]) -> Iterator[ShardWork]:
        """Yield each shard of ``works`` as it leaves the pipeline (committed, or with its error).

        The pipeline is consumed on a side thread; this thread calls ``tick`` (lease heartbeat, watchdog)
        at least once a second meanwhile. If the pipeline itself fails (say a worker node is lost past
        Ray's own retries), the shards it did not return come back with that error, marked retryable.
        """
        ds = self._dataset(works)
        out: queue.SimpleQueue = queue.SimpleQueue()
        done = object()
        abandoned = threading.Event()  # the driver stopped listening (say it lost the lease): stop the pipeline

        def consume() -> None:
            rows = iter(ds.iter_rows())
            try:
                for row in rows:
                    out.put(pickle.loads(row["work"]))
                    if abandoned.is_set():
                        break
            except BaseException as exc:  # handed to the driver thread
                out.put(exc)
            finally:
                close = getattr(rows, "close", None)
                if close is not None:  # shuts Ray Data's streaming executor down
                    close()
            out.put(done)

        threading.Thread(target=consume, name="ray-data-consumer", daemon=True).start()
        try:
            yield from self._collect(works, out, done, tick)
        finally:
            abandoned.set()
        self._add_stats(ds)

    def _collect(self, works: list[ShardWork], out: queue.SimpleQueue, done: object,
                 tick: Callable[[], None]) -> Iterator[ShardWork]:
        returned: set[int] = set()
        while True:
            try:
                got = out.get(timeout=1.0)
            except queue.Empty:
                tick()
                continue
            if got is done:
                break
            if isinstance(got, BaseException):
                log.error("the Ray Data pipeline failed: %s", got)
                for w in works:
                    if w.task.shard not in returned:
                        w.fail(got)
                        returned.add(w.task.shard)
                        yield w
                continue
            returned.add(got.task.shard)
            for stage, secs in got.stage_s.items():  # each stage's own time, also inside a fused operator
                st = self.stage_task_s.setdefault(stage, {"shards": 0, "task_s": 0.0})
                st["shards"] += 1
                st["task_s"] += secs
            yield got
            tick()

    def _add_stats(self, ds) -> None:
        """Fold this window's per-operator statistics (Ray Data's own) into :attr:`stages`."""
        try:
            summary = ds._get_stats_summary()
        except Exception as exc:  # statistics are a report, never a reason to fail a run
            log.debug("no Ray Data statistics: %s", exc)
            return
        log.debug("Ray Data statistics:\n%s", summary.to_string() if hasattr(summary, "to_string") else summary)

        def walk(s) -> None:
            for p in s.parents:
                walk(p)
            for op in s.operators_stats:
                if op.operator_name in ("Input", "FromItems", "ReadFromItems"):
                    continue
                st = self.stages.setdefault(op.operator_name, {"shards": 0, "task_s": 0.0, "wall_s": 0.0})
                st["shards"] += int(op.output_num_rows.sum if op.output_num_rows else 0)
                st["task_s"] += float(op.wall_time.sum if op.wall_time else 0.0)
                if op.earliest_start_time and op.latest_end_time:
                    st["wall_s"] += float(op.latest_end_time - op.earliest_start_time)

        walk(summary)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def window_size(executor: RayDataExecutor, config: PreprocessConfig) -> int:
    """Shards per Dataset: enough for every stage to stay busy (a window's tail leaves CPUs idle only
    once per window), few enough that the driver holds a bounded part of the plan."""
    if config.max_in_flight:
        return max(1, config.max_in_flight)
    return max(64, 8 * executor.cpus)

