"""Import the officially released mPLUG-2 video-caption / video-QA checkpoints (X-PLUG/mPLUG-2 ``.pth``).

Facts (``design/official-ckpt``): every tensor the release's forward uses maps onto ours by renaming alone, with one
index shift (the release allocates 24 fusion layers and runs the last ``fusion.layers``; the offset is read from
the file). Everything else is dropped for a stated reason: the CLIP text tower and image projection, the unused
fusion layers and embeddings, the universal layers' and decoder's never-called "vision FFNs" and stray latents,
``position_ids`` buffers, the QA file's momentum twins (``*_m``), and the LM head's tied copies after checking that
they equal their source. Our MLM head (pre-training only) is the one module left initialised.

Memory: the file is opened with ``torch.load(mmap=True, weights_only=True)``, so tensors stay on disk until read;
only mapped tensors are read, one at a time, straight into the output ``model.safetensors`` (no model is built
around them, no second copy is held). The QA file is ~3 B parameters; the peak stays near the mapped part
(``bench/bench_official.py`` measures it).

The output is a normal model folder (``config.yaml`` with ``vision.image_mode: centre`` so that images run the
temporal modules as the release does, ``model.safetensors``, and ``import_report.json``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import CONFIG_FILE, WEIGHTS_FILE

__all__ = ["TASKS", "OfficialCheckpointError", "OfficialImportReport", "import_official", "map_official_keys",
           "read_official"]

log = logging.getLogger(__name__)

TASKS = ("caption", "qa")
REPORT_FILE = "import_report.json"
# Ours with no official source: the MLM head (pre-training only; its decoder weight is tied to the word embeddings).
KNOWN_NEW = ("mlm_head.transform.dense.weight", "mlm_head.transform.dense.bias",
             "mlm_head.transform.LayerNorm.weight", "mlm_head.transform.LayerNorm.bias", "mlm_head.bias")
# Tied in the release: alias key -> the key holding the value. Checked equal, then dropped.
TIED = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}
_MOMENTUM = re.compile(r"^(visual_encoder|text_encoder|fusion_encoder|text_decoder|visn_emb_norm)_m\.")
_RELEASE_ROOTS = ("visual_encoder.", "text_encoder.", "fusion_encoder.", "text_decoder.", "visn_emb_norm.",
                  "visn_fc.", "visn_layer_norm.")
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


class OfficialCheckpointError(ValueError):
    """The file is not a release checkpoint this importer can use; the message is one line: cause and fix."""


@dataclass
class OfficialImportReport:
    source: str
    task: str
    dtype: str
    fusion_allocated: int
    fusion_offset: int
    mapped: dict[str, str] = field(default_factory=dict)      # official key -> ours
    dropped: dict[str, str] = field(default_factory=dict)     # official key -> reason
    tied_checked: list[str] = field(default_factory=list)     # alias keys found equal to their source
    new: list[str] = field(default_factory=list)              # ours left initialised

    def summary(self) -> str:
        by_reason = Counter(self.dropped.values())
        lines = [f"imported {self.source} ({self.task}, {self.dtype}): {len(self.mapped)} tensors mapped, "
                 f"{len(self.dropped)} dropped, {len(self.tied_checked)} tied pairs checked equal, "
                 f"{len(self.new)} new; fusion: {self.fusion_allocated} layers allocated in the file, "
                 f"the last {self.fusion_allocated - self.fusion_offset} used (offset {self.fusion_offset})"]
        lines += [f"  dropped {n:5d}  {reason}" for reason, n in by_reason.most_common()]
        lines += [f"  new          {k}" for k in self.new]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


# ---------------------------------------------------------------------------------------------------- reading
def read_official(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a release ``.pth``, memory-mapped; unwraps ``model`` / ``module`` / ``state_dict``."""
    p = Path(path)
    if not p.is_file():
        raise OfficialCheckpointError(f"{p}: no such file (give the release's .pth checkpoint)")
    if p.stat().st_size == 0:
        raise OfficialCheckpointError(f"{p}: empty file (an interrupted download? fetch it again)")
    try:
        obj = torch.load(str(p), map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OfficialCheckpointError(
            f"{p}: refused by the weights-only loader ({first[:160]}); it holds Python objects beyond tensors, "
            "which are never unpickled here: re-save just the tensors with torch.save(ckpt['model'], 'sd.pth') "
            "in a trusted environment") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:160]
        if "mmap" in msg and "zipfile" in msg.lower():
            raise OfficialCheckpointError(
                f"{p}: a legacy (pre-zip) torch file, which cannot be memory-mapped: re-save it with a current "
                "torch.save") from None
        raise OfficialCheckpointError(f"{p}: not a readable torch checkpoint ({msg}); truncated or corrupt? "
                                      "compare its size with the release's and download it again") from None
    if isinstance(obj, dict):
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise OfficialCheckpointError(f"{p}: holds no state dict of tensors (expected the release's "
                                      "{'model': state_dict, ...})")
    if all(k.startswith("module.") for k in obj):                      # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _identify_foreign(keys: list[str]) -> str | None:
    """A one-line hint when the keys belong to another known kind of checkpoint."""
    ks = set(keys)
    if any(k.startswith(("bert.", "embeddings.word_embeddings", "encoder.layer.")) for k in ks):
        return "a BERT checkpoint (import those with `mplug2-model convert --bert`)"
    if any(k.startswith(("visual.", "vision_model.", "text_model.", "transformer.resblocks")) for k in ks):
        return "a CLIP checkpoint (import those with `mplug2-model convert --clip`)"
    if any(k.startswith(("vision.", "text.layer.", "decoder.layer.")) for k in ks):
        return "already a model of this project (load it with --model, no import needed)"
    return None


# ---------------------------------------------------------------------------------------------------- mapping
def _fusion_allocated(keys: list[str]) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"fusion_encoder\.encoder\.layer\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def map_official_keys(keys: list[str], cfg: MPLUG2Config) -> tuple[dict[str, str], dict[str, str], int, int]:
    """Naming only: ``(mapped official -> ours, dropped official -> reason, fusion allocated, fusion offset)``.
    Keys the release does not have raise :class:`OfficialCheckpointError`."""
    foreign_keys = [k for k in keys if not k.startswith(_RELEASE_ROOTS) and not _MOMENTUM.match(k)]
    if foreign_keys:
        _unknown(keys, foreign_keys)
    allocated = _fusion_allocated(keys)
    offset = allocated - cfg.fusion.layers
    if offset < 0:
        raise OfficialCheckpointError(f"the file has {allocated} fusion layers but the model config needs "
                                      f"{cfg.fusion.layers}: pass the --config this checkpoint was trained with")
    uni = cfg.text.layers - cfg.text.num_uni_layer            # first universal layer (latents live there)
    mapped: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for k in keys:
        if _MOMENTUM.match(k):
            dropped[k] = "QA momentum twin (*_m): never used at inference, never EMA-synced for fusion"
            continue
        if k in TIED:
            dropped[k] = f"tied copy of {TIED[k]} (checked equal)"
            continue
        if k.endswith("embeddings.position_ids"):
            dropped[k] = "position_ids buffer (ours computes positions)"
            continue
        if k.startswith("visn_emb_norm."):
            mapped[k] = "text.visn_norm." + k[len("visn_emb_norm."):]
        elif k.startswith("visn_fc."):
            mapped[k] = "visn_fc.0." + k[len("visn_fc."):]
        elif k.startswith("visn_layer_norm."):
            mapped[k] = "visn_fc.1." + k[len("visn_layer_norm."):]
        elif k.startswith("visual_encoder.visual."):
            rest = k[len("visual_encoder.visual."):]
            if rest == "proj":
                dropped[k] = "CLIP image projection (the release's VideoFormer never applies it)"
            elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest):
                sub = m.group(2).replace("lmhra1.", "lt1.", 1).replace("lmhra2.", "lt2.", 1)
                mapped[k] = f"vision.blocks.{m.group(1)}.{sub}"
            else:
                mapped[k] = "vision." + rest
        elif k.startswith("visual_encoder."):
            dropped[k] = "CLIP text tower (kept inside the release's XCLIP, never used)"
        elif k.startswith("text_encoder.embeddings."):
            mapped[k] = "text." + k[len("text_encoder."):]
        elif m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.(.+)$", k):
            n, rest = int(m.group(1)), m.group(2)
            if rest.startswith(("intermediate_vision.", "output_vision.")):
                dropped[k] = "universal layer's vision FFN (allocated; the release's forward uses the text FFN)"
            elif rest == "latents":
                if n != uni:
                    unknown.append(k)
                mapped[k] = "text.latents"
            else:
                mapped[k] = f"text.layer.{n}.{rest}"
        elif k.startswith("fusion_encoder.embeddings."):
            dropped[k] = "fusion embeddings (the release's fusion always gets encoder_embeds, never ids)"
        elif m := re.match(r"fusion_encoder\.encoder\.layer\.(\d+)\.(.+)$", k):
            n, rest = int(m.group(1)), m.group(2)
            if n < offset:
                dropped[k] = f"fusion layer allocated but never run (start_layer = {offset})"
            elif rest.startswith("crossattention.") and cfg.fusion.is_connected(n - offset):
                dropped[k] = "cross-attention of a connected fusion layer (allocated by the release, unused)"
            else:
                mapped[k] = f"fusion.layer.{n - offset}.{rest}"
        elif k.startswith("text_decoder.bert.embeddings."):
            mapped[k] = "decoder." + k[len("text_decoder.bert."):]
        elif m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.(.+)$", k):
            rest = m.group(2)
            if rest == "latents" or rest.startswith(("intermediate_vision.", "output_vision.")):
                dropped[k] = "decoder layer's stray latents / vision FFN (allocated by BertLayer, never used)"
            else:
                mapped[k] = f"decoder.layer.{m.group(1)}.{rest}"
        elif k.startswith("text_decoder.cls.predictions."):
            mapped[k] = "decoder.lm_head." + k[len("text_decoder.cls.predictions."):]
        else:
            unknown.append(k)
    if unknown:
        _unknown(keys, unknown)
    return mapped, dropped, allocated, offset


def _unknown(keys: list[str], unknown: list[str]) -> None:
    foreign = _identify_foreign(keys)
    what = f"looks like {foreign}" if foreign else \
        f"{len(unknown)} keys the release does not have, e.g. {', '.join(unknown[:3])}"
    raise OfficialCheckpointError(f"not an mPLUG-2 release caption/QA checkpoint: {what}")


# ---------------------------------------------------------------------------------------------------- import
def _check_task(keys: list[str], task: str) -> None:
    if task not in TASKS:
        raise OfficialCheckpointError(f"--task must be one of {TASKS}, got {task!r}")
    if not any(k.startswith(_RELEASE_ROOTS) for k in keys):
        foreign = _identify_foreign(keys)
        raise OfficialCheckpointError("not an mPLUG-2 release checkpoint: no visual_encoder / text_decoder keys"
                                      + (f"; it looks like {foreign}" if foreign else ""))
    twins = any(_MOMENTUM.match(k) for k in keys)
    if task == "caption" and twins:
        raise OfficialCheckpointError("this file holds the QA model's momentum twins (*_m): it is the video-QA "
                                      "checkpoint; import it with --task qa")
    if task == "qa" and not twins:
        raise OfficialCheckpointError("this file has no momentum twins (*_m), which the release's video-QA "
                                      "checkpoint always holds: it is the caption checkpoint; use --task caption")


def _ours(cfg: MPLUG2Config) -> tuple[dict[str, torch.Size], list[list[str]]]:
    """Our state-dict shapes and tied groups (names sharing one parameter), from a model on ``meta``."""
    from mplug2.models.mplug2 import MPLUG2

    with torch.device("meta"):
        model = MPLUG2(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return shapes, [g for g in groups.values() if len(g) > 1]


def _new_tensors(cfg: MPLUG2Config, seed: int) -> dict[str, Tensor]:
    """Our MLM head, initialised as ``MPLUG2`` initialises it (it has no source in the release)."""
    from mplug2.models.attention import BertLMHead, init_bert_weights

    t = cfg.text
    with torch.device("meta"):
        head = BertLMHead(t.hidden, t.vocab_size, t.ln_eps, torch.nn.Embedding(1, t.hidden))
    head.transform.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_bert_weights(head.transform)
    out = {f"mlm_head.transform.{k}": v.detach() for k, v in head.transform.state_dict().items()}
    out["mlm_head.bias"] = torch.zeros(t.vocab_size)
    return out


def import_official(path: str | Path, task: str, out: str | Path, cfg: MPLUG2Config | None = None,
                    seed: int = 0) -> OfficialImportReport:
    """Write the model folder ``out`` from the release checkpoint ``path``; returns the report (also saved)."""
    cfg = cfg or MPLUG2Config.preset("large")
    cfg.vision.image_mode = "centre"        # the release runs the temporal modules on images too
    cfg.validate()
    sd = read_official(path)
    keys = list(sd)
    _check_task(keys, task)
    mapped, dropped, allocated, offset = map_official_keys(keys, cfg)
    shapes, tied_groups = _ours(cfg)

    wrong = [f"{k} {tuple(sd[k].shape)} vs ours {ours} {tuple(shapes[ours])}" for k, ours in mapped.items()
             if ours in shapes and sd[k].shape != shapes[ours]]
    absent = [f"{k} -> {ours}" for k, ours in mapped.items() if ours not in shapes]
    if wrong or absent:
        first = (wrong or absent)[0]
        raise OfficialCheckpointError(f"the file does not fit this model config ({len(wrong) + len(absent)} "
                                      f"tensors, e.g. {first}): pass --config/--preset matching the checkpoint")
    tied_checked = []
    for alias, src in TIED.items():
        if alias in sd and src in sd:
            if sd[alias].shape != sd[src].shape or not torch.equal(sd[alias], sd[src]):
                raise OfficialCheckpointError(f"{alias} differs from {src}, which it is tied to in the release: "
                                              "the file is corrupt or not a release checkpoint")
            tied_checked.append(alias)

    # Strict: every one of ours is filled, through a tie, or is known-new.
    filled = set(mapped.values())
    for group in tied_groups:
        if filled & set(group):
            filled |= set(group)
    new = sorted(set(shapes) - filled)
    if set(new) != set(KNOWN_NEW):
        missing = sorted(set(new) - set(KNOWN_NEW))
        raise OfficialCheckpointError(f"the file lacks {len(missing)} tensors this model needs, e.g. "
                                      f"{', '.join(missing[:3])}: a different configuration or a partial file")

    dtypes = Counter(sd[k].dtype for k in mapped)
    dtype = dtypes.most_common(1)[0][0]
    if dtype not in _SAFETENSORS_DTYPES:
        raise OfficialCheckpointError(f"tensors stored as {dtype}; expected float16, bfloat16 or float32")
    # One name per tie group in the file (the one from_pretrained prefers: the embeddings).
    skip = {n for g in tied_groups for n in g if n not in mapped.values()}
    tensors: dict[str, Tensor] = {ours: sd[k] for k, ours in mapped.items()}
    tensors.update(_new_tensors(cfg, seed))
    tensors = {k: v for k, v in tensors.items() if k not in skip}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / CONFIG_FILE)
    _write_safetensors(tensors, out / WEIGHTS_FILE, dtype,
                       {"format": "pt", "config": json.dumps(cfg.to_dict()), "source": os.path.basename(str(path))})
    report = OfficialImportReport(source=str(path), task=task, dtype=str(dtype).replace("torch.", ""),
                                  fusion_allocated=allocated, fusion_offset=offset, mapped=mapped, dropped=dropped,
                                  tied_checked=tied_checked, new=new)
    (out / REPORT_FILE).write_text(report.to_json())
    return report


def _write_safetensors(tensors: dict[str, Tensor], path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Stream tensors into a ``.safetensors`` file one at a time (each read from the mmap, cast, written), so
    no second copy of the weights is ever held; the file is written beside and renamed when complete."""
    names = sorted(tensors)
    header: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    item = torch.empty((), dtype=dtype).element_size()
    for n in names:
        size = tensors[n].numel() * item
        header[n] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tensors[n].shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            t = tensors[n].detach().to(dtype).contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)
            del t
    os.replace(tmp, path)
