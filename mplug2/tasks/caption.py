"""Video/image captioning (release ``MPLUG2`` caption model, model-spec §5): vision → universal → decoder on V.

The text encoder and fusion are skipped. Training targets are ``[CLS] prompt caption [SEP]`` with the prompt
("a video of") masked from a token-mean CE; generation starts from ``[CLS] prompt`` and returns only what
follows it (beam 5, length 4–20 at Base/Large; the config's values by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.prefix_lm import PrefixSplitter, pack_targets

__all__ = ["CaptionConfig", "Captioner"]


@dataclass
class CaptionConfig:
    prompt: str = "a video of"
    num_beams: int | None = None    # None -> model config
    max_length: int | None = None
    min_length: int | None = None
    # False: the release's decoding: start from [CLS] alone, the model writes the prompt itself (lengths count
    # it), and a generated prompt is cut off the text afterwards (design/official-ckpt, "Caption decoding").
    force_prompt: bool = True


class Captioner(nn.Module):
    """``forward(batch) -> {"loss"}`` with batch ``{"pixels", "input_ids", "attention_mask"}`` (tokenised
    captions, [CLS] ... [SEP]); ``predict(pixels) -> list[str]``."""

    def __init__(self, model: MPLUG2, tokenizer, cfg: CaptionConfig | None = None) -> None:
        super().__init__()
        self.model, self.tok, self.cfg = model, tokenizer, cfg or CaptionConfig()
        self.splitter = PrefixSplitter.from_tokenizer(tokenizer)
        prompt = tokenizer.encode(self.cfg.prompt) if self.cfg.prompt else []
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)

    def targets(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder ids/mask/labels: ``[CLS] prompt caption [SEP]``, prompt and pads labelled −100."""
        captions = [self.splitter.content(r, m) for r, m in zip(input_ids.cpu(), attention_mask.cpu())]
        ids, mask, labels = pack_targets(captions, self.tok.cls_token_id, self.tok.sep_token_id,
                                         self.tok.pad_token_id, self.prompt_ids.cpu())
        dev = input_ids.device
        return ids.to(dev), mask.to(dev), labels.to(dev)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        vis, vis_mask = self.model.encode_vision(batch["pixels"])
        ids, mask, labels = self.targets(batch["input_ids"], batch["attention_mask"])
        out = self.model.decode(ids, mask, vis, vis_mask, labels=labels, reduction="token_mean")
        return {"loss": out.loss, "caption": out.loss.detach()}

    @torch.no_grad()
    def predict(self, pixels: Tensor) -> list[str]:
        """Generated captions, prompt stripped."""
        vis, vis_mask = self.model.encode_vision(pixels)
        forced = self.prompt_ids.cpu() if self.cfg.force_prompt else torch.zeros(0, dtype=torch.long)
        prompt = torch.cat([torch.tensor([self.tok.cls_token_id]), forced]).to(pixels.device)
        seqs = self.model.generate(vis, vis_mask, num_beams=self.cfg.num_beams, max_length=self.cfg.max_length,
                                   min_length=self.cfg.min_length, prompt_ids=prompt)
        texts = [self.tok.decode(s) for s in seqs]
        if self.cfg.force_prompt or not self.cfg.prompt:
            return texts
        said = self.tok.decode(self.prompt_ids.tolist())
        return [t[len(said):].strip() if t == said or t.startswith(said + " ") else t for t in texts]
