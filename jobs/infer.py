"""Batch inference over a shard corpus on Ray Data: ``mplug2-infer`` and the ``ray job submit`` entrypoint.

    mplug2-infer embed --model outputs/runs/ret-tiny/best --shards s3://bucket/webvid/train \
        --output s3://bucket/webvid/emb-ret-tiny
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.infer caption --model s3://bucket/runs/cap/best --shards ... --output ...

The unfinished shards of the corpus become a Ray Dataset (one row, one block per shard), mapped by an actor
pool: each actor loads the model once (a GPU, or a fraction, per actor where the cluster has GPUs; bf16 there;
CPU actors otherwise) and runs :func:`mplug2.inference.corpus.infer_shard` per shard, which commits one parquet
per input shard. The pool grows with the queue between ``--min-workers`` and ``--max-workers``, so on an
autoscaling cluster pending actors bring up worker nodes. Re-running the same command skips finished shards.
Exit status: 0 ok, 1 some shard damaged or failed, 2 bad arguments or corpus.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from mplug2.runtime import setup_process_env

log = logging.getLogger("mplug2.infer")


def build_parser(prog: str = "mplug2-infer") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Embed, caption or answer questions about every sample "
                                "of a committed shard corpus with a trained model; one parquet per input shard.")
    p.add_argument("task", choices=("embed", "caption", "qa"),
                   help="embed: retrieval index (media + caption embeddings); caption: generated captions; "
                        "qa: answers to --question (default: each sample's caption is its question)")
    p.add_argument("--model", required=True, help="trained model folder (local or s3://)")
    p.add_argument("--shards", required=True, help="corpus prefix holding dataset.json (local or s3://)")
    p.add_argument("--output", required=True, help="output prefix for <split>-NNNNNN.parquet (local or s3://)")
    p.add_argument("--split", default="train", help="shard name prefix in the corpus")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (CUDA + bf16 if the actor sees a GPU, else CPU), "
                                                     "cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16, help="samples per model call")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPU resource per actor (fractions share a GPU); default 1 if the cluster has GPUs now, "
                        "else 0. Set it on an autoscaling cluster whose GPU nodes are at zero")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU resource per actor")
    p.add_argument("--min-workers", type=int, default=1, help="actors kept in the pool")
    p.add_argument("--max-workers", type=int, default=8, help="most actors (capped at the unfinished shards)")
    p.add_argument("--no-embed-texts", dest="embed_texts", action="store_false",
                   help="embed: index media only, no caption rows")
    p.add_argument("--beam-size", type=int, default=3, help="caption: beam width")
    p.add_argument("--max-len", type=int, default=None, help="caption: most generated tokens")
    p.add_argument("--question", default=None, help="qa: ask this of every sample")
    p.add_argument("--overwrite", action="store_true", help="delete this corpus's outputs first and redo all")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no Ray Data progress bars")
    p.add_argument("--log-level", default="INFO")
    return p


class _ShardWorker:
    """A Ray Data actor: loads the model once, then turns each shard row into a committed parquet."""

    def __init__(self, model: str, device: str, options: Any, output: str, metadata: dict[str, Any]):
        import ray
        import torch

        from mplug2.inference.corpus import resolve_device
        from mplug2.inference.predictor import Predictor

        dev, dtype = resolve_device(device)
        if dev == "cpu" and ray.get_gpu_ids():
            logging.getLogger("mplug2.infer").warning(
                "actor holds GPU resource %s but torch sees no CUDA device: running on CPU", ray.get_gpu_ids())
        if dev == "cpu":
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.predictor = Predictor.load(model, device=dev, dtype=dtype)
        self.options, self.output, self.metadata = options, output, metadata

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from mplug2.data.dataset_index import ShardInfo
        from mplug2.inference.corpus import infer_shard

        rows = []
        for name, url, nsamples, nbytes, sha in zip(batch["name"], batch["url"], batch["nsamples"],
                                                    batch["bytes"], batch["sha256"]):
            shard = ShardInfo(str(name), str(url), int(nsamples), int(nbytes) if nbytes >= 0 else None,
                              str(sha) or None)
            rows.append(infer_shard(self.predictor, shard, self.output, self.options, self.metadata).to_row())
        return {k: [r[k] for r in rows] for k in rows[0]}


def run(args: argparse.Namespace):
    """Plan, run the pending shards on Ray Data, return the summary (``InferSummary``)."""
    import ray

    from mplug2 import storage
    from mplug2.inference.corpus import InferConfigError, InferOptions, InferSummary, ShardResult, plan_run
    from mplug2.models.mplug2 import WEIGHTS_FILE
    from mplug2.runtime import init_ray

    t0 = time.monotonic()
    options = InferOptions(task=args.task, batch_size=args.batch_size, embed_texts=args.embed_texts,
                           beam_size=args.beam_size, max_len=args.max_len, question=args.question)
    if not storage.exists(storage.join(args.model, WEIGHTS_FILE)):
        raise InferConfigError(f"--model {args.model}: no such model folder (expected {WEIGHTS_FILE} in it, as "
                               "a fine-tuning run's best/ or `mplug2-model convert` writes)")
    plan = plan_run(args.shards, args.output, model=args.model, options=options, split=args.split,
                    overwrite=args.overwrite)
    summary = InferSummary(task=args.task, skipped=len(plan.finished))
    log.info("%s: %d shards, %d finished earlier, %d to do -> %s", args.shards, len(plan.index),
             len(plan.finished), len(plan.pending), args.output)
    if plan.pending:
        init_ray(args.address)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = args.progress
        gpus = args.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        max_workers = max(1, min(args.max_workers, len(plan.pending)))
        items = [{"name": s.name, "url": s.url, "nsamples": s.nsamples,
                  "bytes": -1 if s.bytes is None else s.bytes, "sha256": s.sha256 or ""} for s in plan.pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # One task = one whole shard (minutes on a real corpus): queue none behind a busy actor, so a shard
        # waits for the next free actor (or one the autoscaler is bringing up) instead.
        pool = ray.data.ActorPoolStrategy(min_size=min(args.min_workers, max_workers), max_size=max_workers,
                                          max_tasks_in_flight_per_actor=1)
        ds = ds.map_batches(
            _ShardWorker, batch_size=1, compute=pool, num_gpus=gpus, num_cpus=args.cpus_per_worker,
            fn_constructor_kwargs={"model": args.model, "device": args.device, "options": options,
                                   "output": args.output,
                                   "metadata": {"task": args.task, "model": args.model, "shards": args.shards}})
        for row in ds.iter_rows():
            result = ShardResult(**{k: row[k] for k in ("shard", "status", "samples", "rows", "seconds", "error")})
            summary.results.append(result)
            log.info("shard %s: %s, %d samples in %.1f s", result.shard, result.status, result.samples,
                     result.seconds)
    summary.seconds = time.monotonic() - t0
    return summary


def main(argv: list[str] | None = None, prog: str = "mplug2-infer") -> int:
    setup_process_env()
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mplug2.data.dataset_index import DatasetIndexError
    from mplug2.inference.corpus import InferConfigError

    try:
        summary = run(args)
    except (DatasetIndexError, InferConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(summary.table(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main(prog="python -m jobs.infer"))
