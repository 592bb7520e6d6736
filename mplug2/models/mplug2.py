"""The mPLUG-2 model: composition of the dual-vision encoder, universal layers, text encoder, fusion and decoder.

Pure torch (no Ray, no storage). Objectives and task heads (``mplug2/objectives``, ``mplug2/tasks``) call the
stage methods below and pick the modules each task needs (model-spec 5); momentum twins deep-copy submodules.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from mplug2.config import MPLUG2Config
from mplug2.generation import GenerationResult, beam_search, greedy_search
from mplug2.models.attention import BertLMHead, init_bert_weights
from mplug2.models.decoder import DecoderOutput, TextDecoder
from mplug2.models.fusion import FusionEncoder
from mplug2.models.text import TextEncoder
from mplug2.models.vision import VisionEncoder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


class MPLUG2(nn.Module):
    def __init__(self, config: MPLUG2Config):
        super().__init__()
        config.validate()
        self.config = config
        ck = config.activation_checkpointing
        v, t = config.vision, config.text
        self.vision = VisionEncoder(v, num_frames=config.num_frames, activation_checkpointing=ck)
        self.visn_fc: nn.Module | None = None
        if v.width != t.hidden:
            self.visn_fc = nn.Sequential(nn.Linear(v.width, t.hidden), nn.LayerNorm(t.hidden, eps=t.ln_eps),
                                         nn.Dropout(t.hidden_dropout))
            init_bert_weights(self.visn_fc, t.init_std)
        self.text = TextEncoder(t, activation_checkpointing=ck)
        self.fusion = FusionEncoder(config.fusion, t, activation_checkpointing=ck)
        self.decoder = TextDecoder(config.decoder, t, activation_checkpointing=ck)
        self.mlm_head = BertLMHead(t.hidden, t.vocab_size, t.ln_eps, self.text.embeddings.word_embeddings)
        init_bert_weights(self.mlm_head.transform, t.init_std)

    # ------------------------------------------------------------------ stages
    def encode_vision(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, T, H, W) -> V (B, Nv, D) after the universal layers and ``visn_emb_norm``, and its
        all-ones mask (B, Nv). Nv = 1 + T*HW, or 1 + num_latents with ``token_compression``."""
        v0 = self.vision(pixels)
        if self.visn_fc is not None:
            v0 = self.visn_fc(v0)
        v, _ = self.text.universal(v0, compress=self.config.token_compression)
        return v, torch.ones(v.shape[:2], dtype=torch.long, device=v.device)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Ids and mask (B, L) -> T (B, L, D), [CLS] state at position 0."""
        return self.text(input_ids, attention_mask)

    def fuse(self, text: Tensor, text_mask: Tensor, vis: Tensor, vis_mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (V_f, T_f)."""
        return self.fusion(text, text_mask, vis, vis_mask)

    def fused_memory(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's memory for text-conditioned tasks (QA, grounding): ``([V_f ; T_f], mask)``."""
        vis, vis_mask = self.encode_vision(pixels)
        text = self.encode_text(input_ids, attention_mask)
        v_f, t_f = self.fuse(text, attention_mask, vis, vis_mask)
        return torch.cat([v_f, t_f], 1), torch.cat([vis_mask, attention_mask], 1)

    def mlm_logits(self, states: Tensor) -> Tensor:
        return self.mlm_head(states)

    def decode(self, input_ids: Tensor, attention_mask: Tensor, memory: Tensor, memory_mask: Tensor,
               labels: Tensor | None = None, *, reduction: str = "token_mean",
               soft_logits: Tensor | DecoderOutput | None = None, alpha: float = 0.0) -> DecoderOutput:
        return self.decoder(input_ids, attention_mask, memory, memory_mask, labels, reduction=reduction,
                            soft_logits=soft_logits, alpha=alpha)

    def generate_with_scores(self, memory: Tensor, memory_mask: Tensor, *, num_beams: int | None = None,
                             max_length: int | None = None, min_length: int | None = None,
                             length_penalty: float = 0.6, prompt_ids: Tensor | None = None, use_cache: bool = True,
                             allowed_token_ids=None) -> GenerationResult:
        cfg = self.config
        kw = dict(max_length=max_length if max_length is not None else cfg.gen_max_len,
                  min_length=min_length if min_length is not None else cfg.gen_min_len,
                  length_penalty=length_penalty, bos_token_id=cfg.decoder.bos_token_id,
                  eos_token_id=cfg.decoder.eos_token_id, prompt_ids=prompt_ids, use_cache=use_cache,
                  allowed_token_ids=allowed_token_ids)
        beams = num_beams if num_beams is not None else cfg.beam
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            if beams == 1:
                return greedy_search(self.decoder, memory, memory_mask, **kw)
            return beam_search(self.decoder, memory, memory_mask, num_beams=beams, **kw)
        finally:
            self.decoder.train(was_training)

    def generate(self, memory: Tensor, memory_mask: Tensor, *, num_beams: int | None = None,
                 max_length: int | None = None, min_length: int | None = None, length_penalty: float = 0.6,
                 prompt_ids: Tensor | None = None, use_cache: bool = True, allowed_token_ids=None) -> list[list[int]]:
        """Best sequence per sample (ids after the prompt, EOS removed). ``num_beams=1`` is greedy."""
        return self.generate_with_scores(memory, memory_mask, num_beams=num_beams, max_length=max_length,
                                         min_length=min_length, length_penalty=length_penalty,
                                         prompt_ids=prompt_ids, use_cache=use_cache,
                                         allowed_token_ids=allowed_token_ids).sequences

    # ------------------------------------------------------------------ bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters per top-level module (tied weights counted once, where first seen)."""
        seen: set[int] = set()
        out: dict[str, int] = {}
        for name, mod in self.named_children():
            n = 0
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            out[name] = n
        return out

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` (tied weights stored once) into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.to_yaml(path / CONFIG_FILE)
        save_model(self, str(path / WEIGHTS_FILE), metadata={"format": "pt", "config": json.dumps(
            self.config.to_dict())})
        log.info("saved MPLUG2 (%d parameters) to %s", sum(self.parameter_counts().values()), path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: MPLUG2Config | None = None,
                        map_location: str | torch.device = "cpu") -> "MPLUG2":
        """Load a ``save_pretrained`` folder; every missing or unexpected key is an error."""
        path = Path(path)
        if not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path / WEIGHTS_FILE} not found (expected a save_pretrained folder)")
        cfg = config or MPLUG2Config.from_yaml(path / CONFIG_FILE)
        model = cls(cfg).to(map_location)
        missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(map_location))
        if missing or unexpected:  # strict=True raises already; kept as a guard for future safetensors versions
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model
