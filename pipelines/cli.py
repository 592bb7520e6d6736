"""``mplug2-data``: command-line front end of the corpus pipeline.

    mplug2-data shard --manifest cc3m.tsv --output s3://bucket/cc3m/train --modality image
    mplug2-data shard --config configs/webvid.yaml --mode extend --manifest new_rows.csv
    mplug2-data verify --output s3://bucket/cc3m/train

Every ``PreprocessConfig`` field is a flag (``image_size`` -> ``--image-size``); a ``--config`` YAML file
sets defaults that explicit flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from pipelines.config import EXECUTORS, FORMATS, MODALITIES, MODES, PRESETS, SAMPLERS, PreprocessConfig
from pipelines.errors import EXIT_BAD_INVOCATION, ConfigError
from pipelines.preflight import credentials_error
from pipelines.resize import RESIZE_MODES
from pipelines.lease import LeaseError

HELP: dict[str, str] = {
    "manifest": "manifest file(s), folder(s) or glob(s), local or s3:// (read in sorted order)",
    "output": "dataset prefix: local folder or s3://bucket/prefix",
    "modality": "one dataset holds one modality",
    "split": "shard name prefix: {split}-NNNNNN.tar",
    "samples_per_shard": "input rows per shard (failures included)",
    "preset": "column flags for a known corpus",
    "input_format": "force the manifest format instead of using the suffix, or name a corpus layout (docs/corpora.md)",
    "column_names": "column names for header-less csv/tsv, space- or comma-separated (CC3M: caption,url)",
    "url_col": "media column: http(s)/s3/file URL or local path ('path' is an alias of 'url')",
    "caption_col": "caption column(s): one, or several (each may hold a list of references)",
    "label_col": "integer label column, written as the cls field",
    "start_col": "clip start column (seconds or HH:MM:SS.fff)",
    "end_col": "clip end column (seconds or HH:MM:SS.fff; empty = end of file)",
    "clips_col": "column holding a list of [start, end] pairs: one sample per clip",
    "box_col": "region box column, COCO [x, y, w, h] in source pixels (grounding): json `box` in written pixels",
    "drop_cols": "manifest columns not to copy into json/parquet",
    "media_template": "turn the media column's ids into file names, e.g. 'video{}.mp4' (MSRVTT-QA's integer ids)",
    "clip_captions": "the caption list holds one caption per clip of --clips-col (ActivityNet, HowTo100M)",
    "allow_empty_caption": "keep rows with an empty caption (default: counted as empty_caption)",
    "media_root": "base for relative media paths (default: each manifest's folder)",
    "threads": "fetch/decode threads per shard task",
    "timeout_s": "per-download timeout in seconds",
    "retries": "extra attempts for HTTP 429/5xx and connection errors (exponential backoff)",
    "max_bytes": "largest accepted media file in bytes (too_large beyond)",
    "honor_robots": "skip sources whose X-Robots-Tag says noai/noindex (opted_out)",
    "user_agent": "HTTP User-Agent",
    "image_size": "output image side in pixels",
    "resize_mode": "img2dataset resize mode",
    "resample": "downscale filter: area (box average, like img2dataset's INTER_AREA; faster) or bicubic",
    "jpeg_quality": "JPEG quality of images and video frames",
    "min_image_size": "smaller side below this is too_small",
    "max_aspect_ratio": "long/short side above this is filtered",
    "num_frames": "frames per video sample (middle/random_segment)",
    "sampler": "frame sampler: middle (eval), random_segment (train), fps",
    "fps": "frame rate for --sampler fps",
    "max_frames": "frame cap for --sampler fps",
    "frame_size": "video frame side in pixels",
    "frame_resize_mode": "resize mode for video frames",
    "video_backend": "pyav or ffmpeg",
    "video_timeout_s": "decode deadline per video",
    "min_duration": "clips shorter than this are too_small",
    "keep_video": "also store the re-encoded clip as an mp4 field",
    "seed": "dataset seed (random_segment draws from seed and key)",
    "mode": "incremental: skip committed shards; overwrite: delete contract objects first; extend: append new rows",
    "retry_failed": "re-fetch rows of committed shards whose failure reason is retryable",
    "max_shard_retry": "retries of a whole-shard failure (storage error, dead worker)",
    "max_in_flight": "shard tasks in flight (default 2 x the tasks that fit the cluster's CPUs)",
    "task_cpus": "CPUs Ray reserves per shard (Ray Data: 3/4 for its decode task, 1/4 for each of fetch and "
                 "commit); below 1 runs more shards at once (threads overlap I/O)",
    "shard_timeout_s": "deadline per shard task",
    "watchdog_s": "global deadline: cancel what is left and report",
    "max_failure_ratio": "exit non-zero (after writing everything) when failed/attempted exceeds this",
    "allow_all_failed": "commit shards even when every row of the run failed (default: nothing is committed "
                        "and the run exits 1, as that usually means a wrong column order or --media-root)",
    "executor": "auto: Ray when a cluster is there (--ray-address, RAY_ADDRESS, a `ray start` cluster on this "
                "machine, inside a Ray job) or model stages are asked for, else a local process pool; ray: a Ray "
                "Data pipeline of stages (starts a local cluster if none); local: process pool, no Ray",
    "ray_address": "Ray cluster address (default RAY_ADDRESS, else a local cluster)",
    "num_cpus": "CPUs for a local Ray cluster / local executor",
    "progress": "show a progress bar",
    "force_unlock": "take over the writer lease even if it looks alive",
    "lease_ttl_s": "writer lease lifetime without heartbeat",
    "score_with": "model folder: ITC similarity of media and caption into each sample's json (Ray actor pool)",
    "min_score": "with --score-with: samples below are counted as low_score and not written",
    "caption_with": "model folder: a generated caption into each sample's json, beside the original",
    "caption_field": "json field of the generated caption",
    "model_batch_size": "samples per forward pass in a model stage",
    "model_gpus": "GPUs per model actor where the cluster has GPUs (a fraction shares one GPU)",
    "model_actors": "most actors per model stage",
}
CHOICES = {"modality": MODALITIES, "mode": MODES, "input_format": FORMATS, "preset": tuple(PRESETS),
           "resize_mode": RESIZE_MODES, "frame_resize_mode": RESIZE_MODES, "sampler": SAMPLERS,
           "executor": EXECUTORS, "resample": ("area", "bicubic"), "video_backend": ("pyav", "ffmpeg")}


def _scalar_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    for cand in (int, float, str):
        if tp is cand or cand in args:
            return cand
    return str


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`PreprocessConfig` field; defaults are None so YAML/dataclass defaults apply."""
    hints = typing.get_type_hints(PreprocessConfig)
    for f in dataclasses.fields(PreprocessConfig):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, "", []) else "")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif "list" in str(tp):
            p.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            p.add_argument(flag, type=_scalar_type(tp), default=None, choices=CHOICES.get(f.name), help=help_)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mplug2-data", description="Corpus preprocessing into WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    # No ArgumentDefaultsHelpFormatter: flag defaults are None (so --config YAML values apply) and the
    # help strings already name the real default once.
    shard = sub.add_parser("shard", help="turn manifests into WebDataset shards (Ray)",
                           description="Fetch, decode and shard a manifest; resumable (see --mode). Exit codes: "
                                       "0 ok, 1 too many failed samples (or every row failed), 2 bad invocation, "
                                       "3 storage unavailable, 4 shards failed or watchdog. Corpus layouts: "
                                       "docs/corpora.md.")
    shard.add_argument("--config", help="YAML file of PreprocessConfig fields (flags override it)")
    shard.add_argument("--local", action="store_true", help="shorthand for --executor local")
    shard.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    add_config_flags(shard)
    verify = sub.add_parser("verify", help="check a written dataset against the contract (tars, sidecars, index)")
    verify.add_argument("--output", required=True)
    verify.add_argument("--split", default="train", help="shard name prefix (default: train)")
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    names = {f.name for f in dataclasses.fields(PreprocessConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if getattr(args, "local", False):
        overrides["executor"] = "local"
    if isinstance(overrides.get("caption_col"), list) and len(overrides["caption_col"]) == 1:
        overrides["caption_col"] = overrides["caption_col"][0]
    if args.config:   # a file here, else the copy shipped with the package (configs/...)
        from mplug2.paths import config_file

        return PreprocessConfig.from_yaml(config_file(args.config), **overrides)
    return PreprocessConfig.from_dict({}, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "verify":
        from pipelines.verify import verify_dataset

        try:
            problems = verify_dataset(args.output, args.split)
        except PermissionError as exc:
            print(f"mplug2-data: error: {credentials_error(args.output, exc)}", file=sys.stderr)
            return EXIT_BAD_INVOCATION
        for p in problems:
            print("PROBLEM:", p)
        print("OK" if not problems else f"{len(problems)} problem(s)")
        return 0 if not problems else 1
    from mplug2.storage import StorageCredentialsError
    from pipelines.run import RunSummary, preprocess

    try:
        config = config_from_args(args)
        summary = preprocess(config)
    except (ConfigError, LeaseError, PermissionError) as exc:
        if isinstance(exc, PermissionError) and not isinstance(exc, StorageCredentialsError):
            exc = credentials_error(getattr(args, "output", None) or "storage", exc)
        print(f"mplug2-data: error: {exc}", file=sys.stderr)
        print(RunSummary(output=str(getattr(args, "output", None) or "-"), mode=str(args.mode or "-"),
                         fingerprint="-", config_error=str(exc)).table())
        return EXIT_BAD_INVOCATION
    print(summary.table())
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
