"""Typed configuration of a training run (pretraining or fine-tuning), loadable from YAML.

A run is identified by ``run_name`` + ``storage``: re-running the same command resumes it. Fields that
change the numerics (model, optimiser, seed, data mixture, global batch, horizon) are fingerprinted and
must match on resume, so a silently different run never continues an old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mplug2.data import defaults as loader_defaults
from mplug2.train.tasks import calibrated_tasks, get_task
from mplug2.typed_config import check_bounds, check_fields, check_keys, float_from_text

STRATEGIES = ("ddp", "fsdp2")   # scale.strategy: mplug2.train.parallel
PLACEHOLDER = "s3://my-bucket"   # configs/pretrain_base.yaml ships it: a run refuses it by field name
BLOCK_TYPES = ("vision", "text", "fusion", "decoder")   # scale.activation_checkpointing: mplug2.train.parallel


@dataclass
class CorpusConfig:
    """One shard dataset written by ``pipelines`` (a local folder or ``s3://`` prefix)."""

    name: str
    path: str
    weight: float = 1.0
    num_frames: int = 4          # frames fed to the model; images use 1
    split: str = "train"         # the shard name prefix written by the pipeline (`--split`)


@dataclass
class DataConfig:
    train: list[CorpusConfig] = field(default_factory=list)
    eval: CorpusConfig | None = None
    # A validation corpus, apart from eval: what a task tunes for inference is chosen here, never on eval
    # (retrieval: the ITM weight of the re-rank). Only for tasks with a calibration (TaskSpec.calibrate).
    val: CorpusConfig | None = None
    batch_size: int = 8          # per rank, per micro-step
    eval_batch_size: int = 16
    num_workers: int = 0         # DataLoader workers per rank (0: in the trainer process)
    shuffle_buffer: int = loader_defaults.SHUFFLE_BUFFER
    shards_in_flight: int = loader_defaults.SHARDS_IN_FLIGHT
    max_text_len: int = loader_defaults.MAX_TEXT_LEN
    augment: bool = loader_defaults.AUGMENT
    # Area range of the training crop; narrow it where a caption names what a crop changes (size, position).
    crop_scale: tuple[float, float] = loader_defaults.CROP_SCALE
    augment_on: str = loader_defaults.AUGMENT_ON     # cpu | device (GPU nodes: the CPU only decodes)
    # Damaged shards / samples are skipped and counted; the run fails past either budget (mplug2.data.damage).
    max_bad_samples: int | None = loader_defaults.MAX_BAD_SAMPLES
    max_bad_fraction: float = loader_defaults.MAX_BAD_FRACTION
    read_attempts: int = loader_defaults.READ_ATTEMPTS   # per shard read, with backoff; then skipped as damaged


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_vision: float = 1e-5      # the spec's lower visual learning rate
    # The ITC temperature's own learning rate (None: lr). Adam moves a scalar by about lr per step whatever its
    # gradient, so a small model's high lr (2e-3) drives the temperature from 0.07 to 0.01 within ~50 steps: ITC
    # logits scale by ~1/temp, their gradient spikes past the clip, and ITM negatives drawn from softmax(sim/temp)
    # become the one nearest caption. ALBEF / mPLUG train it at their base lr, 1e-4: the default.
    lr_temp: float | None = 1e-4
    # The local temporal modules' learning rate (None: lr_vision). They start as exact zero and are the only path
    # by which frame order (a clip's direction) reaches the heads. The demo trains them at 10x: ITC-alone R@1 on
    # its held-out clips 34.7 / 27.8 -> 52.8 / 50.0; at the tiny configs' shorter budget 10x cost R@1, so the
    # default stays lr_vision (docs/benchmarks.md, issue 14).
    lr_temporal: float | None = None
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        for name in ("lr", "lr_vision", "lr_temp", "lr_temporal"):
            value = float_from_text(getattr(self, name))     # YAML 1.1 reads `lr: 3e-4` as a string
            setattr(self, name, value)
            if value is None and name in ("lr_temp", "lr_temporal"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"optim.{name} must be a learning rate (a number >= 0, e.g. 2e-4)"
                                 f"{' or null' if name in ('lr_temp', 'lr_temporal') else ''}; got {value!r}")


@dataclass
class ScheduleConfig:
    total_steps: int = 100
    ckpt_every_steps: int = 50
    eval_every_steps: int = 0    # 0: evaluate at the end only
    log_every_steps: int = 10
    keep_last: int = 3


@dataclass
class ScaleConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # below 1 so Ray Data / loader tasks still get a CPU on small nodes
    max_failures: int = 3
    strategy: str = "ddp"        # ddp | fsdp2 (fully_shard per block, DCP checkpoints; mplug2.train.parallel)
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after each block's forward (less memory)
    precision: str = "fp32"      # fp32 | bf16
    backend: str | None = None   # default: nccl with GPUs, gloo otherwise
    timeout_s: int = 900
    compile: bool = False        # torch.compile every transformer block (mplug2.train.parallel.compile_blocks)
    # block types recomputed in backward (activation checkpointing): any of vision, text, fusion, decoder;
    # None keeps the model config's `activation_checkpointing` (all or nothing)
    activation_checkpointing: list[str] | None = None
    peak_tflops: float | None = None   # dense bf16 peak per device for MFU; None: mplug2.train.flops table


@dataclass
class DebugConfig:
    """Fault injection for tests and drills: fail once at this step (a marker file prevents repeats)."""

    fail_at_step: int | None = None
    fail_rank: int = 0
    deterministic: bool = False
    log_keys: bool = False       # every rank records the sample keys of each step under <run>/keys/


@dataclass
class TrainConfig:
    run_name: str
    storage: str = "outputs/runs"
    task: str = "pretrain"
    model: Any = "tiny"          # preset name, YAML path, or a dict of MPLUG2Config fields
    init_from: str | None = None  # checkpoint dir / save_pretrained folder to start from
    seed: int = 0
    resume: str = "auto"         # auto | never
    loss_weights: dict[str, float] = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "mlm": 1.0,
                                                                     "prefix_lm": 1.0})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # classify: the label names, in head order; each sample's json ``label`` is one of them or its index
    classes: list[str] = field(default_factory=list)
    label_key: str = "label"      # classify: the json field holding each sample's label
    task_options: dict[str, Any] = field(default_factory=dict)   # the task's own typed options (tasks.py)

    def __post_init__(self) -> None:
        self._check_types_and_ranges()
        if isinstance(self.model, dict):     # checked here, before Ray: the workers built it after start-up
            from mplug2.config import MPLUG2Config

            try:
                MPLUG2Config.from_dict(self.model)
            except (TypeError, ValueError) as e:
                raise ValueError(f"model: {e}") from e
        spec = get_task(self.task)
        spec.options(self.task_options)
        spec.validate(self)
        if self.data.val is not None and spec.calibrate is None:
            raise ValueError(f"data.val: task {self.task!r} tunes nothing on a validation corpus (only "
                             f"{', '.join(calibrated_tasks())} do); remove data.val or evaluate with data.eval")
        if self.resume not in ("auto", "never"):
            raise ValueError("resume must be 'auto' or 'never'")
        if self.scale.strategy not in STRATEGIES:
            raise ValueError(f"scale.strategy must be one of {STRATEGIES}, got {self.scale.strategy!r} "
                             "(fsdp2 = torch fully_shard, not Ray's FSDP1 prepare_model)")
        lo, hi = self.data.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale must be (low, high) with 0 < low <= high <= 1, "
                             f"got {self.data.crop_scale}")
        if self.data.augment_on not in loader_defaults.AUGMENT_ON_CHOICES:
            raise ValueError(f"data.augment_on must be one of {loader_defaults.AUGMENT_ON_CHOICES}, "
                             f"got {self.data.augment_on!r}")
        bad = set(self.scale.activation_checkpointing or ()) - set(BLOCK_TYPES)
        if bad:
            raise ValueError(f"scale.activation_checkpointing: unknown block types {sorted(bad)}; "
                             f"choose from {BLOCK_TYPES}")
        if self.scale.precision not in ("fp32", "bf16"):
            raise ValueError(f"scale.precision must be 'fp32' or 'bf16', got {self.scale.precision!r}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError("run_name must be a non-empty name without '/'")

    def _check_types_and_ranges(self) -> None:
        check_fields(self, "")
        for name, bounds in SECTION_BOUNDS.items():
            section = getattr(self, name)
            check_fields(section, name)
            check_bounds(section, name, bounds)
        corpora = [(f"data.train[{i}]", c) for i, c in enumerate(self.data.train)]
        corpora += [(f"data.{split}", getattr(self.data, split)) for split in ("eval", "val")
                    if getattr(self.data, split) is not None]
        for where, corpus in corpora:
            check_fields(corpus, where)
            check_bounds(corpus, where, CORPUS_BOUNDS)
        if not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.optim.betas!r}")

    # --- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def options(self) -> Any:
        """The task's typed options (``task_options`` checked against the registry)."""
        return get_task(self.task).options(self.task_options)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from nested plain values (a YAML file's); unknown keys and misshapen sections fail in one line."""
        d = dict(d)
        check_keys(cls, d, "")
        data = _section(d.pop("data", None), DataConfig, "data")
        if "crop_scale" in data:
            data["crop_scale"] = _crop_scale(data["crop_scale"])
        train = data.get("train") or []
        if not isinstance(train, list):
            raise ValueError(f"data.train must be a list of corpora ({{name, path, ...}} each); got {train!r}")
        data["train"] = [_corpus(c, f"data.train[{i}]") for i, c in enumerate(train)]
        for split in ("eval", "val"):
            if data.get(split) is not None:
                data[split] = _corpus(data[split], f"data.{split}")
        optim = _section(d.pop("optim", None), OptimConfig, "optim")
        if isinstance(optim.get("betas"), list):
            optim["betas"] = tuple(optim["betas"])
        sections = {name: _section(d.pop(name, None), kind, name)
                    for name, kind in (("schedule", ScheduleConfig), ("scale", ScaleConfig), ("debug", DebugConfig))}
        return cls(
            data=DataConfig(**data), optim=OptimConfig(**optim),
            schedule=ScheduleConfig(**sections["schedule"]), scale=ScaleConfig(**sections["scale"]),
            debug=DebugConfig(**sections["debug"]),
            **d,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        d = yaml.safe_load(Path(path).read_text()) or {}
        for dotted, value in (overrides or {}).items():
            set_dotted(d, dotted, value)
        return cls.from_dict(d)

    def resolve_paths(self) -> "TrainConfig":
        """A copy whose local paths (storage, init_from, model YAML, corpora) are absolute: called on the
        driver, so workers in other working directories read and write the same folders (:mod:`mplug2.paths`).
        Fails on a placeholder bucket (``s3://my-bucket``), naming the field to set."""
        from mplug2 import paths

        def local(value: str | None, name: str, output: bool = False) -> str | None:
            if value and str(value).startswith(PLACEHOLDER):
                raise ValueError(f"{name} is the placeholder {value!r}: set it, e.g. --set {name}=s3://<your-bucket>/...")
            return paths.resolve(value, field=name, output=output)

        d = self.to_dict()
        d["storage"] = local(self.storage, "storage", output=True)
        d["init_from"] = local(self.init_from, "init_from")
        if isinstance(self.model, str) and self.model.endswith((".yaml", ".yml")):
            d["model"] = local(self.model, "model")
        for i, corpus in enumerate(d["data"]["train"]):
            corpus["path"] = local(corpus["path"], f"data.train[{i}].path")
        for split in ("eval", "val"):
            if d["data"][split] is not None:
                d["data"][split]["path"] = local(d["data"][split]["path"], f"data.{split}.path")
        return TrainConfig.from_dict(d)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def fingerprint(self) -> str:
        """Hash of the fields that change numerics; ``total_steps`` included (the LR schedule depends on it)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("task", "model", "seed", "loss_weights", "optim", "init_from")}
        if self.classes:
            keep["classes"] = list(self.classes)
        keep["data"] = {k: d["data"][k] for k in ("train", "batch_size", "max_text_len")}
        keep["global_batch"] = self.data.batch_size * self.optim.grad_accum * self.scale.num_workers
        keep["total_steps"] = self.schedule.total_steps
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Each numeric field's range (least, most; None: open), checked with its type when a config is built. Optional
# fields (None) pass. The loop divides by log_every_steps and ckpt_every_steps; Ray keeps at least one checkpoint.
SECTION_BOUNDS: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "data": {"batch_size": (1, None), "eval_batch_size": (1, None), "num_workers": (0, None),
             "shuffle_buffer": (1, None), "shards_in_flight": (1, None), "max_text_len": (3, None),
             "max_bad_samples": (0, None), "max_bad_fraction": (0.0, 1.0), "read_attempts": (1, None)},
    "optim": {"weight_decay": (0.0, None), "warmup_steps": (0, None), "min_lr_ratio": (0.0, 1.0),
              "grad_clip": (0.0, None), "grad_accum": (1, None)},
    "schedule": {"total_steps": (1, None), "ckpt_every_steps": (1, None), "eval_every_steps": (0, None),
                 "log_every_steps": (1, None), "keep_last": (1, None)},
    "scale": {"num_workers": (1, None), "cpus_per_worker": (0.0, None), "max_failures": (-1, None),
              "timeout_s": (1, None), "peak_tflops": (0.0, None)},
    "debug": {"fail_at_step": (1, None), "fail_rank": (0, None)},
}
CORPUS_BOUNDS: dict[str, tuple[float | None, float | None]] = {"weight": (0.0, None), "num_frames": (1, None)}


def _section(raw: Any, kind: type, name: str) -> dict[str, Any]:
    """A config section's keys as a dict, checked against ``kind``'s fields (absent or null: the defaults)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a mapping of {kind.__name__} fields; got {raw!r}")
    check_keys(kind, raw, name)
    return dict(raw)


def _corpus(raw: Any, where: str) -> CorpusConfig:
    if isinstance(raw, CorpusConfig):
        return raw
    fields = _section(raw, CorpusConfig, where)
    missing = [k for k in ("name", "path") if k not in fields]
    if missing:
        raise ValueError(f"{where} needs {' and '.join(missing)} (a corpus is {{name, path, weight, num_frames, "
                         f"split}}); got {raw!r}")
    return CorpusConfig(**fields)


def _crop_scale(value: Any) -> tuple[float, float]:
    """``[low, high]`` from YAML / ``--set`` as a pair of floats, or one line saying what is wrong."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ValueError(f"data.crop_scale must be two numbers [low, high] (area fractions of the frame the "
                         f"training crop keeps), e.g. [0.8, 1.0]; got {value!r}")
    return float(value[0]), float(value[1])


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 3e-4)``; values given as strings are parsed as YAML scalars."""
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    if isinstance(value, str):
        value = yaml.safe_load(value)
        if isinstance(value, str):
            try:        # PyYAML (YAML 1.1) reads "3e-4" as a string; a number is what was meant
                value = float(value)
            except ValueError:
                pass
    d[keys[-1]] = value
