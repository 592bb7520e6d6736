"""Run a preprocessing job: stream the manifest on the driver, one Ray task per output shard.

Why one task per shard (img2dataset's Ray distributor) and not ``Dataset.write_webdataset``: shard names
must be deterministic (``train-000012.tar`` owns input rows ``[12·S, 13·S)``), each shard is committed
as a unit with its sidecars, and resume/retry are shard-granular (data-contract §8, §10). The driver
keeps at most ``max_in_flight`` tasks running, enforces a per-shard deadline and a global watchdog, and
retries whole-shard failures (storage errors, a dead worker) up to ``max_shard_retry`` times.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from mplug2.runtime import setup_process_env
from pipelines import shards
from pipelines.config import PreprocessConfig
from mplug2.storage import StorageUnavailableError
from pipelines.errors import (EXIT_BAD_INVOCATION, EXIT_INCOMPLETE, EXIT_OK, EXIT_STORAGE_UNAVAILABLE,
                              EXIT_TOO_MANY_FAILED, ConfigError)
from pipelines.preflight import check_manifest_provenance, check_output
from pipelines.shard_task import ShardTask, run_shard, warm_up, worker_init
from pipelines.sources import check_manifests, expand_manifests, file_info, iter_rows

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is what the CLI returns."""

    output: str
    mode: str
    fingerprint: str
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    shards_failed: dict[int, str] = field(default_factory=dict)
    rows: int = 0  # samples attempted in this run (rows, or clips for clip lists)
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    watchdog_fired: bool = False
    max_failure_ratio: float = 1.0
    dataset: dict | None = None
    allow_all_failed: bool = False
    held: list = field(default_factory=list)  # (task, result) of shards held back: no row succeeded (yet)
    failure_examples: dict[str, str] = field(default_factory=dict)  # reason -> one message
    storage_error: str | None = None  # storage unavailable past the retry deadline
    config_error: str | None = None

    @property
    def all_failed(self) -> bool:
        """Every attempted sample failed (a wrong column order, --media-root, ids...): nothing committed."""
        return self.rows > 0 and self.successes == 0 and not self.allow_all_failed

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def failure_ratio(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.successes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        storage_down = self.storage_error or (self.shards_failed and all(
            StorageUnavailableError.__name__ in why for why in self.shards_failed.values()))
        if self.config_error:
            return EXIT_BAD_INVOCATION
        if storage_down:
            return EXIT_STORAGE_UNAVAILABLE
        if self.shards_failed or self.watchdog_fired:
            return EXIT_INCOMPLETE
        if self.all_failed or self.failure_ratio > self.max_failure_ratio:
            return EXIT_TOO_MANY_FAILED
        return EXIT_OK

    def table(self) -> str:
        lines = [
            f"output            {self.output}",
            f"mode              {self.mode}  (config {self.fingerprint})",
            f"shards            {len(self.shards_written)} written, {len(self.shards_skipped)} skipped "
            f"(committed), {len(self.shards_failed)} failed",
            f"samples           {self.rows} attempted, {self.successes} written, {self.failed} failed "
            f"({100 * self.failure_ratio:.1f}%)",
        ]
        width = max((len(r) for r in self.failures), default=0) + 2
        for reason, n in sorted(self.failures.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<{width}}{n}")
        lines.append(f"wall time         {self.wall_s:.1f} s  ({self.samples_per_s:.1f} samples/s)")
        for sid, why in sorted(self.shards_failed.items()):
            lines.append(f"FAILED shard {sid}: {why}")
        if self.watchdog_fired:
            lines.append("WATCHDOG: the global deadline ended the run early")
        if self.failure_ratio > self.max_failure_ratio:
            lines.append(f"failure ratio {self.failure_ratio:.3f} > --max-failure-ratio {self.max_failure_ratio}")
        if self.all_failed:
            top = max(self.failures, key=lambda r: self.failures[r]) if self.failures else "?"
            example = self.failure_examples.get(top, "")
            lines.append(f"EVERY ROW FAILED, nothing committed: mostly {top}" + (f" (e.g. {example})" if example
                         else "") + "; check --column-names / --url-col / --caption-col / --media-root / "
                         "--preset against the manifest (--allow-all-failed commits such shards anyway)")
        if self.storage_error:
            lines.append(f"STORAGE UNAVAILABLE: {self.storage_error}; committed shards are intact, re-run the "
                         "same command to resume once the store answers")
        if self.config_error:
            lines.append(f"ERROR: {self.config_error}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- executors
def choose_executor(config: PreprocessConfig) -> str:
    """``ray`` or ``local`` for ``config.executor`` (``auto``: Ray when there is a Ray cluster to use,
    i.e. :func:`ray_cluster_available`; otherwise a local process pool, which on one machine does the same
    work without Ray's start-up and shutdown, several seconds of a short run's wall time)."""
    if config.executor != "auto":
        return config.executor
    return "ray" if ray_cluster_available(config.ray_address) else "local"


def ray_cluster_available(address: str | None = None) -> bool:
    """True when a Ray cluster is there to use: an address (``--ray-address`` / ``RAY_ADDRESS``), a
    ``ray job submit`` driver, a process where Ray is already initialised, or a cluster started with
    ``ray start`` on this machine (its address file and a live GCS process). Never starts or imports Ray."""
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray for a job's driver
        return True
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return True
    return _local_ray_started()


def _local_ray_started() -> bool:
    """A cluster joined with ``ray start`` on this machine (what ``ray.init()`` without an address would
    connect to): the address file ``ray start`` writes (``ray stop`` removes it) names a GCS that answers."""
    if os.environ.get("RAY_TMPDIR"):
        tmp = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        tmp = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        tmp = "/tmp"
    else:
        import tempfile

        tmp = tempfile.gettempdir()
    try:
        with open(os.path.join(tmp, "ray", "ray_current_cluster")) as f:
            address = f.read().strip()
    except OSError:
        return False
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    import socket

    try:  # a cluster killed without `ray stop` leaves the file behind, but nothing listens there
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


class _RayExecutor:
    """One Ray task per shard, 1 CPU each, no Ray-level retries (the driver retries and reports)."""

    can_kill = True  # ray.cancel(force=True) kills the worker: a timed-out shard can be retried safely

    def __init__(self, config: PreprocessConfig):
        import ray

        from mplug2.runtime import init_ray

        self.ray = ray
        self.started = not ray.is_initialized() and not (config.ray_address or os.environ.get("RAY_ADDRESS"))
        # A cluster this run starts for itself lives as long as the run: no dashboard (it costs ~1 s of
        # start-up, measured 2.7-4.5 s vs 3.4-5.8 s for ray.init on 2 busy cores); `ray start` gives one.
        extra = {"include_dashboard": False} if self.started and not _local_ray_started() else {}
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


class _LocalExecutor:
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


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    tasks: Iterator[ShardTask]
    manifests: list[dict]  # filled while streaming: path, skip_rows, rows, shards [first, last]


def _plan(config: PreprocessConfig, paths: list[str], cmaps: dict, existing: dict[int, dict],
          start_shard: int, skip: dict[str, int], owner: str, summary: RunSummary) -> _Plan:
    """Group streamed rows into shards; skip committed ones (or schedule them for --retry-failed)."""
    S = config.samples_per_shard
    records: dict[str, dict] = {p: {"path": p, "skip_rows": skip.get(p, 0), "rows": 0, "shards": None}
                                for p in paths}

    def gen() -> Iterator[ShardTask]:
        shard, rows = start_shard, []

        def emit(shard_id: int, chunk: list) -> ShardTask | None:
            for r in chunk:
                rec = records[r.source]
                rec["rows"] += 1
                lo, hi = rec["shards"] or (shard_id, shard_id)
                rec["shards"] = [min(lo, shard_id), max(hi, shard_id)]
            if shard_id in existing:
                st = existing[shard_id]
                if config.retry_failed and st.get("retryable_failures", 0) > 0:
                    return ShardTask(shard_id, [], cmaps, retry_failed=True, lease_owner=owner)
                summary.shards_skipped.append(shard_id)
                return None
            return ShardTask(shard_id, chunk, cmaps, lease_owner=owner)

        for row in iter_rows(paths, config, skip):
            rows.append(row)
            if len(rows) == S:
                t = emit(shard, rows)
                if t:
                    yield t
                shard, rows = shard + 1, []
        if rows:
            t = emit(shard, rows)
            if t:
                yield t

    return _Plan(tasks=gen(), manifests=[records[p] for p in paths])


def _check_fingerprints(existing: dict[int, dict], prev: dict | None, fp: str) -> None:
    bad = sorted(i for i, s in existing.items() if s.get("config_fingerprint") != fp)
    if prev and prev.get("config_fingerprint") not in (None, fp):
        bad = bad or [-1]
    if bad:
        raise ConfigError(f"the output already holds shards written with another config (fingerprint mismatch on "
                          f"shards {bad[:5]}{'...' if len(bad) > 5 else ''}); re-run with --mode overwrite to "
                          "replace them, or restore the original config")


# ---------------------------------------------------------------------------------------------- main
@dataclass
class _Prepared:
    """Everything start-up checks and planning produce before the first shard is submitted."""

    lease: shards.WriterLease
    prev: dict | None
    existing: dict[int, dict]
    pending: dict | None
    extended: bool
    start_shard: int
    skip: dict[str, int]
    plan: _Plan
    tasks: Iterator[ShardTask]
    first: ShardTask | None


def _prepare(config: PreprocessConfig, out: shards.Output, fp: str, summary: RunSummary) -> _Prepared:
    """Start-up checks (everything that can be wrong with the inputs fails here, before any write), the
    writer lease, overwrite's deletions, the resume/extend plan and the first shard's rows."""
    check_output(out.url)  # before anything else: a missing bucket is never created, credentials fail here
    paths = expand_manifests(config.manifest)
    cmaps = check_manifests(paths, config)
    log.info("%d manifest file(s); columns %s", len(paths), {p: cm.url for p, cm in cmaps.items()})

    out.ensure()
    lease = shards.WriterLease(out, ttl_s=config.lease_ttl_s)
    lease.acquire(force=config.force_unlock, settle=False)
    try:
        if not out.remote:  # staging folders of killed runs (never contract objects)
            for name in os.listdir(out.url):
                if name.startswith(".staging-"):
                    shutil.rmtree(os.path.join(out.url, name), ignore_errors=True)
        shards.recover_commits(out, config.split)
        prev = out.read_json("dataset.json")
        if config.mode == "overwrite":
            n = shards.delete_contract_objects(out, config.split)
            log.info("overwrite: deleted %d contract objects under %s", n, out.url)
            existing, prev = {}, None
        else:
            existing = shards.committed_stats(out, config.split)
            _check_fingerprints(existing, prev, fp)
            if config.mode == "incremental":
                check_manifest_provenance(prev, paths, out.url)
        # An extend run numbers rows after earlier runs, so its layout is not "row i -> shard i // S" of the
        # current manifests. Its plan (first shard, rows to skip) is stored before the first shard is written
        # and removed once the run completes: a killed extend resumes the same plan, never re-plans.
        pending = out.read_json(shards.PENDING_EXTEND) if config.mode != "overwrite" else None
        extended = bool(pending) or bool(prev and (prev.get("extended")
                                                   or any(m.get("skip_rows") for m in prev.get("manifests", []))))
        if config.mode == "incremental" and extended:
            raise ConfigError(f"{out.url} was built with --mode extend, so its shards do not follow the plain row "
                              "layout: resume or add rows with --mode extend, or rebuild with --mode overwrite")
        skip: dict[str, int] = {}
        start_shard = 0
        plan_existing = existing if config.mode != "extend" else {}
        if config.mode == "extend" and pending:
            start_shard, skip, plan_existing = int(pending["start_shard"]), dict(pending["skip"]), existing
            log.info("extend: resuming an unfinished extend from shard %d (rows skipped: %s)", start_shard, skip)
        elif config.mode == "extend":
            start_shard = max(existing) + 1 if existing else 0
            for m in (prev or {}).get("manifests", []):
                skip[m["path"]] = max(skip.get(m["path"], 0), int(m.get("skip_rows", 0)) + int(m.get("rows", 0)))
            log.info("extend: new shards from %d; rows already consumed: %s", start_shard, skip)
        plan = _plan(config, paths, cmaps, plan_existing, start_shard, skip, lease.owner, summary)
        tasks = iter(plan.tasks)
        first = next(tasks, None)
    except BaseException:
        lease.release()
        raise
    return _Prepared(lease, prev, existing, pending, extended, start_shard, skip, plan, tasks, first)


def _prepare_beside_ray(config: PreprocessConfig, out: shards.Output, fp: str,
                        summary: RunSummary) -> tuple[_Prepared, _RayExecutor]:
    """Start Ray (seconds: a local cluster, or a connection) on this thread while start-up checks and
    planning run on a side thread. ``ray.init`` stays on the main thread (it installs a SIGTERM handler
    there). If either side fails, the other is cleaned up (lease released / Ray shut down)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="plan") as side:
        planned = side.submit(_prepare, config, out, fp, summary)
        try:
            executor = _RayExecutor(config)
        except BaseException:
            try:
                planned.result().lease.release()
            except BaseException:  # the planning error, if any, matters less than Ray's
                pass
            raise
        try:
            return planned.result(), executor
        except BaseException:
            executor.close()
            raise


def preprocess(config: PreprocessConfig) -> RunSummary:
    """Preprocess ``config.manifest`` into WebDataset shards under ``config.output``; see module doc."""
    setup_process_env()
    t0 = time.monotonic()
    config.validate()
    fp = config.fingerprint()
    out = shards.Output(config.output)
    summary = RunSummary(output=out.url, mode=config.mode + (" +retry-failed" if config.retry_failed else ""),
                         fingerprint=fp, max_failure_ratio=config.max_failure_ratio,
                         allow_all_failed=config.allow_all_failed)
    try:
        return _preprocess(config, out, fp, summary, t0)
    except StorageUnavailableError as exc:  # past the retry deadline: report, never a traceback
        log.error("storage unavailable: %s", exc)
        summary.storage_error = str(exc)
        summary.wall_s = time.monotonic() - t0
        return summary


def _preprocess(config: PreprocessConfig, out: shards.Output, fp: str, summary: RunSummary,
                t0: float) -> RunSummary:
    kind = choose_executor(config)
    log.info("executor: %s%s", kind, " (auto)" if config.executor == "auto" else "")
    executor = None
    if kind == "ray":
        prep, executor = _prepare_beside_ray(config, out, fp, summary)
    else:
        executor = _LocalExecutor(config)  # its workers start while the driver plans
        try:
            prep = _prepare(config, out, fp, summary)
        except BaseException:
            executor.close()
            raise
    lease, prev, existing, pending, first = prep.lease, prep.prev, prep.existing, prep.pending, prep.first
    try:
        config_dict = config.to_dict()
        if first is not None:
            writes_plan = config.mode == "extend" and not pending
            # The lease settles (WriterLease.confirm) while the first shards already run when that is
            # safe: each shard task waits out the settle delay itself before its commit-time lease check,
            # so no shard commits earlier than before. Ray start-up already covers the delay; an extend
            # must store its plan before any shard can commit.
            early = isinstance(executor, _LocalExecutor) and not writes_plan
            if not early:
                lease.confirm()
                if writes_plan:
                    out.write_bytes(shards.PENDING_EXTEND, shards.canonical_json(
                        {"start_shard": prep.start_shard, "skip": prep.skip, "config_fingerprint": fp,
                         "owner": lease.owner}))
            _drive(config, config_dict, executor, first, prep.tasks, lease, summary, t0, unconfirmed=early)
            _settle_held(config, config_dict, executor, lease, summary, t0)
        else:
            for _ in prep.tasks:  # pragma: no cover - nothing left after the first None
                pass

        summary.shards_written.sort()
        wrote = bool(summary.shards_written)
        if wrote or (prev is None and existing) or pending:
            lease.confirm()
            all_stats = shards.committed_stats(out, config.split)
            manifests = _manifest_records(prep.plan.manifests, prev, config.mode)
            summary.dataset = shards.finalize_dataset(
                out, config.split, config=config.to_dict(), fingerprint=fp, manifests=manifests, stats=all_stats,
                extended=prep.extended or (config.mode == "extend" and prep.start_shard > 0))
        else:
            summary.dataset = prev
            log.info("nothing new to write; dataset files left as they are")
        if config.mode == "extend" and (pending or first is not None) and not summary.shards_failed \
                and not summary.watchdog_fired:
            out.delete(shards.PENDING_EXTEND)
    finally:
        if executor is not None:
            executor.close()
        lease.release()
    summary.shards_written.sort()
    summary.shards_skipped.sort()
    summary.wall_s = time.monotonic() - t0
    return summary


def _manifest_records(current: list[dict], prev: dict | None, mode: str) -> list[dict]:
    """Manifest entries for dataset.json: earlier runs' entries (extend) plus this run's, with hashes."""
    records = list((prev or {}).get("manifests", [])) if mode == "extend" else []
    for rec in current:
        if mode == "extend" and rec["rows"] == 0:
            continue
        try:
            info = file_info(rec["path"])
        except OSError as exc:
            info = {"path": rec["path"], "error": str(exc)}
        records.append({**info, **rec})
    return records


def _drive(config: PreprocessConfig, config_dict: dict, executor, first: ShardTask, tasks: Iterator[ShardTask],
           lease: shards.WriterLease, summary: RunSummary, t0: float, unconfirmed: bool = False) -> None:
    """Submit shard tasks with bounded concurrency; collect, retry, time out, report progress.

    ``unconfirmed``: the lease has not settled yet; tasks are submitted with ``commit_not_before`` (they
    wait out the settle delay before their commit-time lease check) and the lease is confirmed once the
    first tasks run (a lost lease raises :class:`~pipelines.shards.LeaseError` here; no shard commits).
    """
    from tqdm import tqdm

    max_in_flight = config.max_in_flight or max(2, int(2 * executor.cpus / getattr(config, "task_cpus", 1.0)))
    in_flight: dict[Any, tuple[ShardTask, float, int]] = {}  # handle -> (task, started, attempt)
    pending_retry: list[tuple[ShardTask, int]] = []
    next_task: ShardTask | None = first
    bar = tqdm(unit="sample", desc="shards 0", disable=not config.progress, dynamic_ncols=True, mininterval=1.0)
    done_shards = 0

    def submit(task: ShardTask, attempt: int) -> None:
        # Until one row of the run succeeds, a shard where every row failed is held back, not committed.
        task.hold_if_all_failed = not (config.allow_all_failed or summary.successes or task.retry_failed
                                       or task.force_commit)
        if unconfirmed:
            task.commit_not_before = lease.settles_at
        in_flight[executor.submit(config_dict, task)] = (task, time.monotonic(), attempt)

    try:
        while True:
            while len(in_flight) < max_in_flight and not summary.watchdog_fired:
                if pending_retry:
                    submit(*pending_retry.pop(0))
                elif next_task is not None:
                    submit(next_task, 1)
                    next_task = next(tasks, None)
                else:
                    break
            if not in_flight:
                break
            if unconfirmed:
                lease.confirm()
                unconfirmed = False
            done = executor.wait(list(in_flight), timeout=1.0)
            now = time.monotonic()
            for h in done:
                task, _, attempt = in_flight.pop(h)
                try:
                    stats = executor.result(h)
                except Exception as exc:  # whole-shard failure: storage, lost lease, dead worker
                    why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    _shard_failed(task, attempt, why, config, pending_retry, summary)
                    continue
                if stats.get("held"):
                    summary.held.append((task, stats))
                    log.warning("shard %d: every row failed (%s); held back until a row of the run succeeds",
                                task.shard, stats["failures"])
                    continue
                done_shards += 1
                summary.shards_written.append(task.shard)
                summary.rows += stats["count"]
                summary.successes += stats["successes"]
                for r, n in stats["failures"].items():
                    summary.failures[r] = summary.failures.get(r, 0) + n
                bar.update(stats["count"])
                bar.set_description(f"shards {done_shards}")
                bar.set_postfix(ok=summary.successes, failed=summary.failed,
                                sps=f"{summary.successes / max(1e-9, now - t0):.0f}")
                log.info("shard %d committed: %d/%d samples in %.1fs", task.shard, stats["successes"],
                         stats["count"], stats["duration"])
            for h, (task, started, attempt) in list(in_flight.items()):
                if now - started > config.shard_timeout_s:
                    executor.cancel(h)
                    in_flight.pop(h)
                    why = f"past the per-shard deadline of {config.shard_timeout_s}s"
                    if not executor.can_kill:  # never let a retry race the still-running first attempt
                        summary.shards_failed[task.shard] = why + " (local executor: not retried)"
                        continue
                    _shard_failed(task, attempt, why, config, pending_retry, summary)
            if config.watchdog_s and now - t0 > config.watchdog_s and not summary.watchdog_fired:
                log.error("watchdog: %.0fs elapsed, cancelling %d running shards", now - t0, len(in_flight))
                summary.watchdog_fired = True
                for h, (task, _, _) in list(in_flight.items()):
                    executor.cancel(h)
                    summary.shards_failed[task.shard] = "cancelled by the global watchdog"
                in_flight.clear()
                pending_retry.clear()
                break
            lease.renew()
    finally:
        bar.close()


def _settle_held(config: PreprocessConfig, config_dict: dict, executor, lease: shards.WriterLease,
                 summary: RunSummary, t0: float) -> None:
    """Shards held back because every row failed: if some row of the run succeeded, they are real (dead
    links) and are run again to commit; if none did, the set-up is wrong: count them, commit nothing."""
    held, summary.held = summary.held, []
    if not held:
        return
    if summary.successes == 0:
        for _task, stats in held:
            summary.rows += stats["count"]
            for r, n in stats["failures"].items():
                summary.failures[r] = summary.failures.get(r, 0) + n
            for r, msg in stats.get("examples", {}).items():
                summary.failure_examples.setdefault(r, msg)
        return
    log.info("%d shard(s) where every row failed: committing them now that other rows succeeded", len(held))
    tasks = [task for task, _ in held]
    for t in tasks:
        t.force_commit = True
    _drive(config, config_dict, executor, tasks[0], iter(tasks[1:]), lease, summary, t0)


def _shard_failed(task: ShardTask, attempt: int, why: str, config: PreprocessConfig,
                  pending_retry: list, summary: RunSummary) -> None:
    if attempt <= config.max_shard_retry and "lease" not in why:
        log.warning("shard %d failed (attempt %d/%d), retrying: %s", task.shard, attempt,
                    config.max_shard_retry + 1, why)
        pending_retry.append((task, attempt + 1))
    else:
        log.error("shard %d failed for good after %d attempt(s): %s", task.shard, attempt, why)
        summary.shards_failed[task.shard] = why
