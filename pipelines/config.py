"""The preprocessing configuration: one dataclass, YAML-loadable, with a fingerprint of what shapes the bytes.

The fingerprint covers exactly the options that change shard *content* (column mapping, sizes, sampler,
seed, ``samples_per_shard``...). Operational knobs (threads, timeouts, retries, resume mode, Ray address)
are left out, so a re-run with more threads still resumes, while a re-run at another image size does not
silently mix two kinds of samples in one dataset (data-contract §10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mplug2.typed_config import check_fields, check_keys
from pipelines.errors import ConfigError
from pipelines.resize import RESIZE_MODES

MODALITIES = ("image", "video")
MODES = ("incremental", "overwrite", "extend")
SAMPLERS = ("middle", "random_segment", "fps")
FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "json", "json_by_media", "msrvtt_videodatainfo", "karpathy",
           "activitynet_captions", "howto100m_captions")  # the last five: pipelines.corpora layouts
EXECUTORS = ("auto", "ray", "local")

# Column presets for the corpora people download (docs/corpora.md: one tested command per preset and what each
# sample's json then holds). Explicit flags win over a preset.
_CLIP_LAYOUT = {"url_col": "video_id", "media_template": "{}.mp4", "caption_col": "caption", "clips_col": "clips",
                "clip_captions": True, "modality": "video"}
PRESETS: dict[str, dict[str, Any]] = {
    # Conceptual Captions: header-less tsv, caption then url (CC3M) / url then caption (CC12M).
    "cc3m": {"column_names": ["caption", "url"], "url_col": "url", "caption_col": "caption", "modality": "image"},
    "cc12m": {"column_names": ["url", "caption"], "url_col": "url", "caption_col": "caption", "modality": "image"},
    # LAION parquet: URL, TEXT, WIDTH, HEIGHT, similarity, ... (Hugging Face re-exports add __index_level_0__).
    "laion": {"url_col": "URL", "caption_col": "TEXT", "modality": "image"},
    # WebVid csv: videoid, contentUrl, duration (ISO 8601 text; the probed duration
    # is written instead, so the column is dropped), page_dir, name.
    "webvid": {"url_col": "contentUrl", "caption_col": "name", "modality": "video", "drop_cols": ["duration"]},
    # MSR-VTT as ALBEF ships it (msrvtt_train.json: one entry per caption; test: caption lists): one sample
    # per video, every caption kept.
    "msrvtt": {"input_format": "json_by_media", "url_col": "video", "caption_col": "caption", "modality": "video"},
    # MSR-VTT's original train_val_videodatainfo.json (videos + sentences joined on video_id).
    "msrvtt-videodatainfo": {"input_format": "msrvtt_videodatainfo", "url_col": "video_id",
                             "media_template": "{}.mp4", "caption_col": "caption", "modality": "video"},
    # Video QA json lists with integer video ids: {"question", "answer", "video_id": 7010, "id"}.
    "msrvtt-qa": {"url_col": "video_id", "media_template": "video{}.mp4", "caption_col": "question",
                  "modality": "video"},
    "msvd-qa": {"url_col": "video_id", "media_template": "vid{}.avi", "caption_col": "question", "modality": "video"},
    # COCO / Flickr30k: Karpathy's dataset_coco.json (or ALBEF's per-caption lists): one sample per image.
    "coco": {"input_format": "karpathy", "url_col": "image", "caption_col": "caption", "modality": "image"},
    # RefCOCO-style grounding (jsonl/csv/json): image, referring expression (`sentence` also accepted), COCO bbox.
    "refcoco": {"url_col": "image", "caption_col": "expression", "box_col": "bbox", "modality": "image"},
    # ActivityNet Captions / HowTo100M caption.json: one sample per clip, each with its own sentence.
    "activitynet": {"input_format": "activitynet_captions", **_CLIP_LAYOUT},
    "howto100m": {"input_format": "howto100m_captions", **_CLIP_LAYOUT},
}

# Fields that do not change the bytes of a shard (left out of the fingerprint).
_OPERATIONAL = frozenset({
    "manifest", "output", "mode", "retry_failed", "threads", "timeout_s", "retries", "max_shard_retry",
    "max_in_flight", "task_cpus", "shard_timeout_s", "watchdog_s", "max_failure_ratio", "allow_all_failed", "ray_address", "executor",
    "num_cpus", "progress", "force_unlock", "user_agent", "preset", "lease_ttl_s", "media_root",
    "model_batch_size", "model_gpus", "model_actors",
})


@dataclass
class PreprocessConfig:
    """Everything a preprocessing run needs. Field docs double as ``--help`` text in the CLI."""

    manifest: list[str] = field(default_factory=list)  # files, folders or globs; local or s3://
    output: str = ""  # dataset prefix: a local folder or s3://bucket/prefix
    modality: str = "image"
    split: str = "train"
    samples_per_shard: int = 1000
    preset: str | None = None

    # Manifest columns (data-contract §2).
    input_format: str = "auto"
    column_names: list[str] | None = None  # for header-less csv/tsv (CC3M)
    url_col: str = "url"
    caption_col: str | list[str] = "caption"
    label_col: str | None = None
    start_col: str | None = None
    end_col: str | None = None
    clips_col: str | None = None
    box_col: str | None = None  # grounding: COCO [x, y, w, h] in source pixels -> json `box` in written pixels
    drop_cols: list[str] = field(default_factory=list)  # manifest columns not to keep as extras
    media_template: str | None = None  # media column value -> file name, e.g. "video{}.mp4" (integer ids)
    clip_captions: bool = False  # the caption list holds one caption per clip (ActivityNet, HowTo100M)
    allow_empty_caption: bool = False
    media_root: str | None = None  # base for relative media paths (default: the manifest's folder)

    # Fetch.
    threads: int = 16
    timeout_s: float = 10.0
    retries: int = 2
    max_bytes: int = 256 << 20
    honor_robots: bool = True
    user_agent: str = "mplug2-ray/0.1 (+https://github.com/mplug2-ray; img2dataset-compatible opt-out)"

    # Images.
    image_size: int = 256
    resize_mode: str = "border"
    resample: str = "area"  # downscale filter: area (box; img2dataset's INTER_AREA, ~2x cheaper) | bicubic
    jpeg_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf

    # Videos (pipelines.video.VideoOptions).
    num_frames: int = 8
    sampler: str = "middle"
    fps: float = 1.0
    max_frames: int = 64
    frame_size: int = 224
    frame_resize_mode: str = "center_crop"
    video_backend: str = "pyav"
    video_timeout_s: float = 60.0
    min_duration: float = 0.0
    keep_video: bool = False
    seed: int = 0

    # Run control (data-contract §10).
    mode: str = "incremental"
    retry_failed: bool = False
    max_shard_retry: int = 2
    max_in_flight: int | None = None  # default: 2 x cluster CPUs
    task_cpus: float = 1.0  # CPUs Ray reserves per shard task (its threads may use more)
    shard_timeout_s: float = 3600.0
    watchdog_s: float | None = None  # global deadline for the whole run
    max_failure_ratio: float = 1.0
    allow_all_failed: bool = False  # commit shards even when every row of the run failed
    executor: str = "auto"  # "auto" (Ray when a cluster is there, else local) | "ray" | "local" (process pool)
    ray_address: str | None = None
    num_cpus: int | None = None
    progress: bool = True
    force_unlock: bool = False
    lease_ttl_s: float = 120.0

    # Model stages (Ray Data path): curation with the model being trained (pipelines.model_stages).
    score_with: str | None = None  # model folder: ITC similarity of media and caption into each sample's json
    min_score: float | None = None  # with score_with: samples scoring below are counted low_score, not written
    caption_with: str | None = None  # model folder: a generated caption into each sample's json
    caption_field: str = "generated_caption"  # the json field of the generated caption
    model_batch_size: int = 32  # samples per forward pass in a model stage
    model_gpus: float = 1.0  # GPUs per model actor where the cluster has GPUs (a fraction shares a GPU)
    model_actors: int = 2  # most actors per model stage (the pool grows from one as work queues up)

    def __post_init__(self) -> None:
        if isinstance(self.manifest, str):
            self.manifest = [self.manifest]
        if self.column_names is not None:  # "caption,url", ["caption,url"] and ["caption", "url"] alike
            names = [self.column_names] if isinstance(self.column_names, str) else self.column_names
            self.column_names = [n.strip() for part in names for n in str(part).split(",") if n.strip()]
        if self.preset:
            if self.preset not in PRESETS:
                raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
            defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                 else f.default) for f in dataclasses.fields(self)}
            for k, v in PRESETS[self.preset].items():
                if getattr(self, k) == defaults[k]:  # explicit flags win over the preset
                    setattr(self, k, v)
        if isinstance(self.caption_col, (list, tuple)) and len(self.caption_col) == 1:
            self.caption_col = self.caption_col[0]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` for any option that cannot work, before anything is written."""
        try:
            check_fields(self, "")              # a YAML value of the wrong type: one line naming the field
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.manifest:
            raise ConfigError("no manifest given (--manifest)")
        if not self.output:
            raise ConfigError("no output prefix given (--output)")
        checks = [
            (self.modality in MODALITIES, f"modality must be one of {MODALITIES}"),
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.input_format in FORMATS, f"input_format must be one of {FORMATS}"),
            (self.samples_per_shard >= 1, "samples_per_shard must be >= 1"),
            (self.samples_per_shard < 1_000_000, "samples_per_shard must be < 1,000,000 (6-digit row keys)"),
            (self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}"),
            (self.box_col is None or self.modality == "image", "--box-col needs --modality image"),
            (self.resample in ("area", "bicubic"), "resample must be 'area' or 'bicubic'"),
            (self.frame_resize_mode in RESIZE_MODES, f"frame_resize_mode must be one of {RESIZE_MODES}"),
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality must be in 1..100"),
            (self.image_size >= 1 and self.frame_size >= 1, "sizes must be >= 1"),
            (1 <= self.num_frames <= 1000 and 1 <= self.max_frames <= 1000, "frame counts must be in 1..1000"),
            (self.threads >= 1, "threads must be >= 1"),
            (self.task_cpus > 0, "task_cpus must be > 0"),
            (self.retries >= 0 and self.max_shard_retry >= 0, "retries must be >= 0"),
            (self.max_bytes > 0, "max_bytes must be > 0"),
            (self.max_aspect_ratio >= 1, "max_aspect_ratio must be >= 1"),
            (0 <= self.max_failure_ratio <= 1, "max_failure_ratio must be in [0, 1]"),
            (self.executor in EXECUTORS, f"executor must be one of {EXECUTORS}"),
            (self.split.isalnum() or set(self.split) <= set("abcdefghijklmnopqrstuvwxyz0123456789_"),
             "split must be [a-z0-9_] (it prefixes shard names)"),
            (not (self.mode == "extend" and self.retry_failed), "--retry-failed cannot be combined with extend"),
            (self.min_score is None or self.score_with, "--min-score needs --score-with MODEL_DIR"),
            (not (self.has_model_stages and self.executor == "local"),
             "--score-with / --caption-with run as Ray actor pools: use --executor ray (or auto)"),
            (self.caption_field.isidentifier() and self.caption_field not in ("key", "url", "caption", "score"),
             "caption_field must be a plain name other than key/url/caption/score"),
            (self.model_batch_size >= 1 and self.model_actors >= 1 and self.model_gpus > 0,
             "model_batch_size and model_actors must be >= 1, model_gpus > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if "." in self.split or "/" in self.split or "-" in self.split:
            raise ConfigError("split must not contain '.', '/' or '-'")

    @property
    def has_model_stages(self) -> bool:
        return bool(self.score_with or self.caption_with)

    # ------------------------------------------------------------------ identity
    def content_dict(self) -> dict[str, Any]:
        """The options that shape shard bytes (what the fingerprint hashes)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _OPERATIONAL}
        if d["max_aspect_ratio"] == math.inf:
            d["max_aspect_ratio"] = None
        if self.modality == "image":  # video knobs do not affect image shards, and vice versa
            for k in ("num_frames", "sampler", "fps", "max_frames", "frame_size", "frame_resize_mode",
                      "video_backend", "video_timeout_s", "min_duration", "keep_video", "start_col",
                      "end_col", "clips_col"):
                d.pop(k, None)
        else:
            for k in ("image_size", "resize_mode", "resample", "min_image_size", "max_aspect_ratio"):
                d.pop(k, None)
        if self.modality == "video" and self.sampler != "random_segment":
            d.pop("seed", None)
        d["SOURCE_DATE_EPOCH"] = os.environ.get("SOURCE_DATE_EPOCH")
        return d

    def fingerprint(self) -> str:
        """Short sha256 of :meth:`content_dict`: equal fingerprints mean interchangeable shards."""
        blob = json.dumps(self.content_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["max_aspect_ratio"] == math.inf:
            d["max_aspect_ratio"] = None
        return d

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "PreprocessConfig":
        merged = {**(data or {}), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            check_keys(cls, merged, "")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if merged.get("max_aspect_ratio") is None:
            merged.pop("max_aspect_ratio", None)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> "PreprocessConfig":
        """Load a YAML file of field names (``image_size: 256``); ``overrides`` (non-None) win."""
        import yaml

        from mplug2 import storage

        data = yaml.safe_load(storage.read_bytes(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        return cls.from_dict(data, **overrides)
