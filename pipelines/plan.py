"""Resume planning: start-up checks, the writer lease, and which shards this run writes.

Shard membership is fixed by the plan (row ``i`` of the plain layout goes to shard ``i // S``; an extend
run numbers its rows after earlier runs'), so it does not depend on the executor or on timing.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Iterator

from pipelines import shards
from pipelines.lease import WriterLease
from pipelines.config import PreprocessConfig
from pipelines.errors import ConfigError
from pipelines.preflight import check_manifest_provenance, check_output
from pipelines.shard_task import ShardTask
from pipelines.sources import check_manifests, expand_manifests, file_info, iter_rows
from pipelines.summary import RunSummary

log = logging.getLogger(__name__)


@dataclass
class Plan:
    tasks: Iterator[ShardTask]
    manifests: list[dict]  # filled while streaming: path, skip_rows, rows, shards [first, last]


def plan_shards(config: PreprocessConfig, paths: list[str], cmaps: dict, existing: dict[int, dict],
          start_shard: int, skip: dict[str, int], owner: str, summary: RunSummary) -> Plan:
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

    return Plan(tasks=gen(), manifests=[records[p] for p in paths])


def check_fingerprints(existing: dict[int, dict], prev: dict | None, fp: str) -> None:
    bad = sorted(i for i, s in existing.items() if s.get("config_fingerprint") != fp)
    if prev and prev.get("config_fingerprint") not in (None, fp):
        bad = bad or [-1]
    if bad:
        raise ConfigError(f"the output already holds shards written with another config (fingerprint mismatch on "
                          f"shards {bad[:5]}{'...' if len(bad) > 5 else ''}); re-run with --mode overwrite to "
                          "replace them, or restore the original config")


@dataclass
class Prepared:
    """Everything start-up checks and planning produce before the first shard is submitted."""

    lease: WriterLease
    prev: dict | None
    existing: dict[int, dict]
    pending: dict | None
    extended: bool
    start_shard: int
    skip: dict[str, int]
    plan: Plan
    tasks: Iterator[ShardTask]
    first: ShardTask | None


def prepare(config: PreprocessConfig, out: shards.Output, fp: str, summary: RunSummary) -> Prepared:
    """Start-up checks (everything that can be wrong with the inputs fails here, before any write), the
    writer lease, overwrite's deletions, the resume/extend plan and the first shard's rows."""
    check_output(out.url)  # before anything else: a missing bucket is never created, credentials fail here
    paths = expand_manifests(config.manifest)
    cmaps = check_manifests(paths, config)
    log.info("%d manifest file(s); columns %s", len(paths), {p: cm.url for p, cm in cmaps.items()})

    out.ensure()
    lease = WriterLease(out, ttl_s=config.lease_ttl_s)
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
            check_fingerprints(existing, prev, fp)
        # An extend run numbers rows after earlier runs, so its layout is not "row i -> shard i // S" of the
        # current manifests. Its plan (first shard, rows to skip) is stored before the first shard is written
        # and removed once the run completes: a killed extend resumes the same plan, never re-plans.
        pending = out.read_json(shards.PENDING_EXTEND) if config.mode != "overwrite" else None
        extended = bool(pending) or bool(prev and (prev.get("extended")
                                                   or any(m.get("skip_rows") for m in prev.get("manifests", []))))
        if config.mode == "incremental" and extended:
            raise ConfigError(f"{out.url} was built with --mode extend, so its shards do not follow the plain row "
                              "layout: resume or add rows with --mode extend, or rebuild with --mode overwrite")
        if config.mode == "incremental":
            check_manifest_provenance(prev, paths, out.url)
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
        plan = plan_shards(config, paths, cmaps, plan_existing, start_shard, skip, lease.owner, summary)
        tasks = iter(plan.tasks)
        first = next(tasks, None)
    except BaseException:
        lease.release()
        raise
    return Prepared(lease, prev, existing, pending, extended, start_shard, skip, plan, tasks, first)


def manifest_records(current: list[dict], prev: dict | None, mode: str) -> list[dict]:
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
