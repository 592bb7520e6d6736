"""A model folder ready for inference: the eval transform, ITC embeddings, ITM scores, captions and answers.

Nothing here is a second copy of the task code: embeddings and ITM go through
:class:`~mplug2.tasks.retrieval.Retriever` (``encode_items`` / ``encode_texts`` / ``itm_scores``), captions through
:class:`~mplug2.tasks.caption.Captioner`, answers through :class:`~mplug2.tasks.qa.VideoQA`, frames through the
evaluation's :class:`~mplug2.data.transforms.VideoTransform`, texts through the same cleaning as evaluation.

Pixel layout at this API: ``pixels_from_frames`` gives ``(T, 3, H, W)`` per item; the methods take a stack
``(B, T, 3, H, W)`` of items with the same T (images: T = 1) and reorder it to the model's ``(B, 3, T, H, W)``.

ITC/ITM heads are not part of the bare model: they come from ``head.safetensors`` beside it when a retrieval run
exported one. Without it the projections are seeded (the same in every process, so an index written by ``embed``
is searchable by ``retrieve``) but untrained, and :attr:`Predictor.heads_trained` is False.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from mplug2.config import MPLUG2Config
from mplug2.data.text import pre_caption
from mplug2.data.transforms import TransformConfig, VideoTransform
from mplug2.models.mplug2 import MPLUG2
from mplug2.tasks.caption import CaptionConfig, Captioner
from mplug2.tasks.qa import QAConfig, VideoQA
from mplug2.tasks.retrieval import RetrievalConfig, Retriever, rerank_score
from mplug2.tokenizer import load_tokenizer

__all__ = ["Predictor", "OFFICIAL_CAPTION", "OFFICIAL_QA"]

log = logging.getLogger(__name__)

# The release's decoding (design/official-ckpt "Caption decoding"): caption from [CLS] alone, lengths counting the
# prompt the model writes itself; QA beam 5, max 10.
OFFICIAL_CAPTION = dict(beam_size=5, min_len=4, max_len=20)
OFFICIAL_QA = dict(beam_size=5, min_len=1, max_len=10)
_HEAD_SEED = 0


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Predictor:
    """Inference over one model; build it with :meth:`load`."""

    def __init__(self, model: MPLUG2, tokenizer, *, heads: dict[str, Tensor] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 num_frames: int | None = None, rerank_itm_weight: float | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or _default_dtype(self.device)
        self.config: MPLUG2Config = model.config
        self.tok = tokenizer
        with torch.random.fork_rng(devices=[]):    # untrained heads: the same in every process
            torch.manual_seed(_HEAD_SEED)
            weight = {} if rerank_itm_weight is None else {"rerank_itm_weight": rerank_itm_weight}  # None: default
            self.retriever = Retriever(model, tokenizer, RetrievalConfig(queue_size=0, distill=False, **weight))
        self.heads_trained = self._load_heads(heads or {})
        self._warned = False
        self.retriever.to(self.device, self.dtype).eval()
        self.model = model
        self.num_frames = int(num_frames or self.config.num_frames)
        self.image_res = int(self.config.vision.image_res)
        self.transform = VideoTransform(TransformConfig(res=self.image_res, train=False))

    @classmethod
    def load(cls, model_dir: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
             num_frames: int | None = None) -> "Predictor":
        """A local or ``s3://`` model folder; bf16 on CUDA and fp32 on CPU unless ``dtype`` says otherwise."""
        from mplug2.model_folder import load_model_folder, read_heads, read_rerank_weight

        model = load_model_folder(model_dir)
        tok = load_tokenizer(model.config.tokenizer)
        return cls(model, tok, heads=read_heads(model_dir), device=device, dtype=dtype, num_frames=num_frames,
                   rerank_itm_weight=read_rerank_weight(model_dir))

    def _load_heads(self, heads: dict[str, Tensor]) -> bool:
        """Copy ITC projections / ITM head (and the trained ITC temperature, which :meth:`rerank_scores` needs;
        the model config's when an older export lacks it) from an exported ``head.safetensors`` (keys matched by
        suffix)."""
        core = self.retriever.core
        state = core.state_dict()
        wanted = {k: v for k, v in state.items() if k.startswith(("itc.vision_proj.", "itc.text_proj.", "itm_head."))}
        found = {}
        for k, v in {**wanted, "itc.temp": state["itc.temp"]}.items():
            match = next((h for h in heads if h == k or h.endswith("." + k)), None)
            if match is not None and heads[match].shape == v.shape:
                found[k] = heads[match]
        if all(k in found for k in wanted):
            core.load_state_dict(found, strict=False)
            return True
        return False

    def _warn_untrained_heads(self) -> None:
        if not self.heads_trained and not self._warned:
            self._warned = True
            log.warning("no trained ITC/ITM heads beside the model (head.safetensors from a retrieval run): "
                        "embeddings and ITM scores use seeded, untrained projections")

    # ------------------------------------------------------------------ inputs
    def pixels_from_frames(self, frames: Sequence[Image.Image]) -> Tensor:
        """The evaluation transform of one item: ``(T, 3, image_res, image_res)`` float32."""
        return self.transform(list(frames)).permute(1, 0, 2, 3).contiguous()

    def _pixels(self, pixels: Tensor) -> Tensor:
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be (B, T, 3, H, W), got {tuple(pixels.shape)}")
        return pixels.permute(0, 2, 1, 3, 4).to(self.device, self.dtype)

    def _texts(self, texts: Sequence[str], clean=pre_caption) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        tok = self.tok([clean(t) for t in texts], max_length=self.config.max_text_len)
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ embeddings and matching
    @torch.inference_mode()
    def embed_media(self, pixels: Tensor) -> Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, embed_dim)`` L2-normalised ITC embeddings (float32, on CPU)."""
        self._warn_untrained_heads()
        return self.retriever.encode_items(self._pixels(pixels))[2].float().cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """``B`` texts -> ``(B, embed_dim)`` L2-normalised ITC embeddings (float32, on CPU)."""
        self._warn_untrained_heads()
        ids, mask = self._texts(texts)
        return self.retriever.encode_texts(ids, mask)[1].float().cpu()

    @torch.inference_mode()
    def itm_logits(self, pixels: Tensor, texts: Sequence[str]) -> Tensor:
        """ITM logits ("no match", "match") of item i with text i, ``(B, 2)`` float32 on CPU."""
        self._warn_untrained_heads()
        if len(texts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} items but {len(texts)} texts")
        vis, vis_mask, _ = self.retriever.encode_items(self._pixels(pixels))
        ids, mask = self._texts(texts)
        text, _ = self.retriever.encode_texts(ids, mask)
        return self.retriever.itm_logits(vis, vis_mask, text, mask).float().cpu()

    @torch.inference_mode()
    def itm_scores(self, pixels: Tensor, texts: Sequence[str]) -> Tensor:
        """Probability that item i matches text i, ``(B,)`` float32 on CPU."""
        return torch.softmax(self.itm_logits(pixels, texts), dim=-1)[:, 1]

    def rerank_scores(self, itm_logits: Tensor, cosine: Tensor) -> Tensor:
        """Evaluation's re-rank score (:func:`~mplug2.tasks.retrieval.rerank_score`) of pairs with these ITM
        logits ``(B, 2)`` and ITC cosines ``(B,)``, at the trained temperature and the ITM weight the model's
        retrieval run chose on its validation corpus (``rerank.json``; 1 without one)."""
        temp = self.retriever.core.itc.temp.detach().item()
        return rerank_score(itm_logits.float().cpu(), cosine.float().cpu(), temp,
                            itm_weight=self.retriever.cfg.rerank_itm_weight)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def caption(self, pixels: Tensor, *, beam_size: int | None = None, min_len: int | None = None,
                max_len: int | None = None, prompt: str = "a video of", official_decoding: bool = False,
                use_cache: bool = True) -> list[str]:
        """Captions, prompt stripped. Defaults: the model config's beam and lengths (counted after the prompt);
        ``official_decoding`` = the release's (``OFFICIAL_CAPTION``, lengths counting the prompt)."""
        if official_decoding:
            o = OFFICIAL_CAPTION
            beam_size, min_len, max_len = beam_size or o["beam_size"], min_len or o["min_len"], max_len or o["max_len"]
        cfg = CaptionConfig(prompt=prompt, num_beams=beam_size, min_length=min_len, max_length=max_len,
                            force_prompt=not official_decoding, use_cache=use_cache)
        return Captioner(self.model, self.tok, cfg).predict(self._pixels(pixels))

    @torch.inference_mode()
    def answer(self, pixels: Tensor, questions: Sequence[str], *, beam_size: int | None = None,
               min_len: int = 1, max_len: int | None = None, official_decoding: bool = False) -> list[str]:
        """Generated answers, one per (item, question) row. ``official_decoding``: beam 5, max 10."""
        if len(questions) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} items but {len(questions)} questions")
        if official_decoding:
            beam_size, min_len, max_len = OFFICIAL_QA["beam_size"], OFFICIAL_QA["min_len"], OFFICIAL_QA["max_len"]
        ids, mask = self._texts(questions)   # evaluation cleans questions as captions
        qa = VideoQA(self.model, self.tok, QAConfig(num_beams=beam_size, max_length=max_len, min_length=min_len))
        return qa.predict(self._pixels(pixels), ids, mask)
