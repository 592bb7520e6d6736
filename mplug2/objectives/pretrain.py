"""The mPLUG-2 pretraining wrapper: ITC + ITM + MLM + prefix LM over one shared forward (model-spec §4, §7).

``MPLUG2Pretrainer`` owns the online :class:`~mplug2.models.mplug2.MPLUG2`, the ITC head (projections,
temperature, queues), the ITM head and, when distillation or the queue needs them, momentum twins of the whole
model and of the ITC projections. One call of :meth:`forward` on a batch::

    {"pixels": (B,3,T,H,W) float, "input_ids": (B,L) long, "attention_mask": (B,L) long, "ids": (B,) long?}

returns ``{"loss", "itc", "itm", "mlm", "prefix_lm", "itm_acc", "alpha", "temp"}`` (and ``itm_rev_acc``, the
share of time-reversed clips ITM calls a non-match, with ``itm_reversed_negatives``). Call
:meth:`momentum_update` once per *optimizer* step (not per micro-batch); it also advances the α ramp.
:meth:`param_groups` implements §7's optimiser rule. Under DDP wrap this module with
``forward_sync_buffers=False`` (``broadcast_buffers=False`` on older torch) so the queues are not broadcast.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.models.vision import LocalTemporal
from mplug2.objectives.itc import ITCConfig, ITCHead, caption_ids
from mplug2.objectives.itm import ITMHead, itm_loss, reversed_clip_logits
from mplug2.objectives.mlm import IGNORE_INDEX, MaskingConfig, mask_tokens, mlm_loss
from mplug2.objectives.momentum import MomentumPairs
from mplug2.objectives.prefix_lm import PrefixSplitter

__all__ = ["PretrainConfig", "MPLUG2Pretrainer", "param_groups", "is_no_decay"]

log = logging.getLogger(__name__)

OBJECTIVES = ("itc", "itm", "mlm", "prefix_lm")


@dataclass
class PretrainConfig:
    """Loss weights and distillation settings; ``None`` fields fall back to the model config."""

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    prefix_lm_weight: float = 1.0
    alpha: float | None = None          # distillation weight (model config: 0.4)
    alpha_ramp_steps: int = 0           # α grows linearly from 0 over this many optimizer steps (one epoch)
    distill: bool = True                # momentum soft targets for ITC, MLM and prefix LM
    momentum: float | None = None       # EMA factor (model config: 0.995)
    queue_size: int | None = None       # ITC queue (model config); 0 = in-batch keys gathered with gradient
    global_batch: int | None = None     # micro-batch x world size, checked against the queue at start-up
    use_ids: bool = True                # id-aware ITC positives / ITM negatives when the batch has "ids"
    same_caption_matches: bool = True   # a clip and another clip's identical caption are a match (ITC
                                        # positive, never an ITM negative): corpora repeat captions
    mlm_probability: float | None = None
    prefix_prompt: str | None = None    # optional instruction prompt, masked from the prefix-LM loss

    def __post_init__(self) -> None:
        for name in OBJECTIVES:
            if getattr(self, f"{name}_weight") < 0:
                raise ValueError(f"{name}_weight must be >= 0")
        if self.alpha_ramp_steps < 0:
            raise ValueError("alpha_ramp_steps must be >= 0")


_TEMP_NAME = re.compile(r"(^|\.)temp$")
_NO_DECAY_NAMES = re.compile(r"(^|\.)(positional_embedding|position_embeddings|latents|temp)(\.|$)")


def is_no_decay(name: str, p: Tensor) -> bool:
    """§7: no weight decay on tensors with < 2 dims, positional embeddings, latents or the temperature."""
    return p.dim() < 2 or bool(_NO_DECAY_NAMES.search(name))


def param_groups(module: nn.Module, lr: float, lr_vision: float, weight_decay: float,
                 vision_prefixes: tuple[str, ...] = ("model.vision.",), lr_temp: float | None = None,
                 lr_temporal: float | None = None) -> list[dict]:
    """AdamW groups: (vision | rest) x (decay | no decay); frozen tensors are left out. ``lr_temp`` (when
    given) puts the ITC temperatures in a group of their own at that learning rate, without decay;
    ``lr_temporal`` (when given) puts every :class:`~mplug2.models.vision.LocalTemporal` module's parameters in
    ``temporal_*`` groups at that learning rate, with the same decay rule.

    Each group carries a ``name`` for logging. Tied parameters appear once.
    """
    temporal = ({id(p) for m in module.modules() if isinstance(m, LocalTemporal) for p in m.parameters()}
                if lr_temporal is not None else set())
    lrs = {"vision": lr_vision, "temporal": lr_temporal, "rest": lr}
    groups: dict[tuple[str, bool], list] = {(k, d): [] for k in lrs for d in (True, False)}
    temps: list[Tensor] = []
    seen: set[int] = set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if lr_temp is not None and _TEMP_NAME.search(name):
            temps.append(p)
            continue
        kind = "temporal" if id(p) in temporal else "vision" if name.startswith(vision_prefixes) else "rest"
        groups[(kind, not is_no_decay(name, p))].append(p)
    out = []
    for (kind, decay), params in groups.items():
        if params:
            out.append({"name": f"{kind}_{'decay' if decay else 'no_decay'}", "params": params, "lr": lrs[kind],
                        "weight_decay": weight_decay if decay else 0.0})
    if temps:
        out.append({"name": "temp", "params": temps, "lr": lr_temp, "weight_decay": 0.0})
    return out


class MPLUG2Pretrainer(nn.Module):
    """Online model + heads + momentum twins; ``forward(batch) -> dict`` of losses."""

    def __init__(self, model: MPLUG2, tokenizer, cfg: PretrainConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PretrainConfig()
        mc = model.config
        if tokenizer.vocab_size != mc.text.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model expects "
                             f"{mc.text.vocab_size}")
        self.model = model
        width = mc.text.hidden
        queue = mc.queue_size if cfg.queue_size is None else cfg.queue_size
        self.alpha_max = mc.alpha if cfg.alpha is None else cfg.alpha
        self.itc = ITCHead(ITCConfig(width=width, embed_dim=mc.embed_dim, queue_size=queue, temp=mc.temp),
                           global_batch=cfg.global_batch)
        self.itm_head = ITMHead(width)
        self.use_momentum = cfg.distill or queue > 0
        self.momentum: MomentumPairs | None = None
        if self.use_momentum:
            self.momentum = MomentumPairs({"model": model, "vision_proj": self.itc.vision_proj,
                                           "text_proj": self.itc.text_proj},
                                          mc.momentum if cfg.momentum is None else cfg.momentum)
        self.masking = MaskingConfig.from_tokenizer(
            tokenizer, mc.mlm_probability if cfg.mlm_probability is None else cfg.mlm_probability)
        self.splitter = PrefixSplitter.from_tokenizer(tokenizer)
        prompt = tokenizer.encode(cfg.prefix_prompt) if cfg.prefix_prompt else []
        self.register_buffer("prefix_prompt", torch.tensor(prompt, dtype=torch.long), persistent=False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        log.info("pretrainer: weights itc=%s itm=%s mlm=%s prefix_lm=%s, queue=%d, distill=%s, alpha=%s",
                 cfg.itc_weight, cfg.itm_weight, cfg.mlm_weight, cfg.prefix_lm_weight, queue, cfg.distill,
                 self.alpha_max)

    # ------------------------------------------------------------------ schedule
    @property
    def alpha(self) -> float:
        """Current distillation weight: ``α·min(1, updates / ramp)``; 0 without distillation."""
        if not self.cfg.distill:
            return 0.0
        ramp = self.cfg.alpha_ramp_steps
        return self.alpha_max * (min(1.0, int(self.num_updates) / ramp) if ramp > 0 else 1.0)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA the twins and advance the α ramp; once per optimizer step."""
        if self.momentum is not None:
            self.momentum.update()
        self.num_updates += 1

    def param_groups(self, lr: float, lr_vision: float, weight_decay: float, lr_temp: float | None = None,
                     lr_temporal: float | None = None) -> list[dict]:
        return param_groups(self, lr, lr_vision, weight_decay, lr_temp=lr_temp, lr_temporal=lr_temporal)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pixels, ids, mask = batch["pixels"], batch["input_ids"], batch["attention_mask"]
        sample_ids = batch.get("ids") if self.cfg.use_ids else None
        text_ids = caption_ids(batch["input_ids"], batch["attention_mask"]) if self.cfg.same_caption_matches else None
        model, cfg, alpha = self.model, self.cfg, self.alpha
        dev = ids.device
        vis, vis_mask = model.encode_vision(pixels)
        text = model.encode_text(ids, mask)

        m_model = self.momentum["model"] if self.momentum is not None else None
        vis_m = None
        f_v_m = f_t_m = None
        if m_model is not None:
            with torch.no_grad():
                vis_m, _ = m_model.encode_vision(pixels)
                text_m = m_model.encode_text(ids, mask)
                f_v_m = F.normalize(self.momentum["vision_proj"](vis_m[:, 0]), dim=-1)
                f_t_m = F.normalize(self.momentum["text_proj"](text_m[:, 0]), dim=-1)

        zero = torch.zeros((), device=dev)
        out: dict[str, Tensor] = {}
        itc = self.itc(self.itc.embed_vision(vis[:, 0]), self.itc.embed_text(text[:, 0]), f_v_m, f_t_m,
                       ids=sample_ids, alpha=alpha, text_ids=text_ids)
        out["itc"] = itc.loss

        if cfg.itm_weight > 0:
            itm = itm_loss(model.fuse, self.itm_head, vis, vis_mask, text, mask, itc.local_i2t, itc.local_t2i,
                           ids=sample_ids, text_ids=text_ids, random_mix=model.config.itm_random_negatives)
            out["itm"] = itm.loss
            out["itm_acc"] = (itm.logits.argmax(1) == itm.labels).float().mean().detach()
            rev = reversed_clip_logits(model.encode_vision, model.fuse, self.itm_head, pixels, text, mask,
                                       model.config.itm_reversed_negatives)
            if rev is not None:   # one cross-entropy over the 3B pairs and the reversed clips (all non-matches)
                n_pairs, n_rev = itm.logits.shape[0], rev.shape[0]
                rev_loss = F.cross_entropy(rev, torch.zeros(n_rev, dtype=torch.long, device=dev))
                out["itm"] = (n_pairs * itm.loss + n_rev * rev_loss) / (n_pairs + n_rev)
                out["itm_rev_acc"] = (rev.argmax(1) == 0).float().mean().detach()
        else:
            out["itm"] = zero

        if cfg.mlm_weight > 0:
            masked, labels = mask_tokens(ids, mask, self.masking)
            _, fused = model.fuse(model.encode_text(masked, mask), mask, vis, vis_mask)
            chosen = labels != IGNORE_INDEX   # the vocabulary projection runs on the ~15 % masked tokens only
            logits = model.mlm_logits(fused[chosen])
            soft = None
            if m_model is not None and alpha > 0:
                with torch.no_grad():
                    _, fused_m = m_model.fuse(m_model.encode_text(masked, mask), mask, vis_m, vis_mask)
                    soft = m_model.mlm_logits(fused_m[chosen])
            out["mlm"] = mlm_loss(logits, labels[chosen], soft, alpha)
        else:
            out["mlm"] = zero

        if cfg.prefix_lm_weight > 0:
            split = self.splitter.split(ids, mask, prompt=self.prefix_prompt.cpu())
            v_f, t_f = model.fuse(model.encode_text(split.prefix_ids, split.prefix_mask), split.prefix_mask,
                                  vis, vis_mask)
            memory = torch.cat([v_f, t_f], 1)
            mem_mask = torch.cat([vis_mask, split.prefix_mask], 1)
            soft = None
            if m_model is not None and alpha > 0:
                with torch.no_grad():
                    v_fm, t_fm = m_model.fuse(m_model.encode_text(split.prefix_ids, split.prefix_mask),
                                              split.prefix_mask, vis_m, vis_mask)
                    soft = m_model.decode(split.target_ids, split.target_mask, torch.cat([v_fm, t_fm], 1),
                                          mem_mask)   # projected to the vocabulary only where a loss is taken
            dec = model.decode(split.target_ids, split.target_mask, memory, mem_mask, labels=split.target_labels,
                               reduction="token_mean", soft_logits=soft, alpha=alpha)
            out["prefix_lm"] = dec.loss
        else:
            out["prefix_lm"] = zero

        out["loss"] = (cfg.itc_weight * out["itc"] + cfg.itm_weight * out["itm"] + cfg.mlm_weight * out["mlm"]
                       + cfg.prefix_lm_weight * out["prefix_lm"])
        out["alpha"] = torch.tensor(alpha, device=dev)
        out["temp"] = self.itc.temp.detach()
        return out
