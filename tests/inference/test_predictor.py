"""The Predictor is the task code applied to one's own items: trained ITC/ITM heads exported beside the model are
used (embeddings equal the retrieval task's), and the eval transform is evaluation's."""

from __future__ import annotations

import random

import torch
from PIL import Image
from safetensors.torch import save_file

from mplug2.config import MPLUG2Config
from mplug2.data.transforms import TransformConfig, VideoTransform
from mplug2.inference import Predictor
from mplug2.models.mplug2 import MPLUG2
from mplug2.tasks.retrieval import RetrievalConfig, Retriever, rerank_score
from tests.tiny import one_thread, tok  # noqa: F401  (fixtures)


def test_exported_retrieval_heads_are_used(tmp_path, tok):
    torch.manual_seed(0)
    task = Retriever(MPLUG2(MPLUG2Config.preset("tiny")), tok, RetrievalConfig(queue_size=0, distill=False)).eval()
    with torch.no_grad():
        for p in task.core.itc.parameters():
            p.add_(torch.randn_like(p))                        # unlike any fresh init
        task.core.itc.temp.fill_(0.03)                         # a trained temperature, not the config's 0.07
    task.model.save_pretrained(tmp_path)
    save_file({n: p.detach().contiguous() for n, p in task.named_parameters() if not n.startswith("core.model.")},
              str(tmp_path / "head.safetensors"))             # what TrainLoop.export writes
    pred = Predictor.load(str(tmp_path))
    assert pred.heads_trained
    frames = [Image.new("RGB", (40, 30), (10 * i, 200, 30)) for i in range(4)]
    pixels = pred.pixels_from_frames(frames)
    assert pixels.shape == (4, 3, 32, 32)
    want = VideoTransform(TransformConfig(res=32, train=False))(frames, random.Random(0))    # (3, T, H, W)
    assert torch.equal(pixels, want.permute(1, 0, 2, 3))
    texts = ["a red circle moving left", "a blue square"]
    ids = tok(texts, max_length=pred.config.max_text_len)
    with torch.no_grad():
        assert torch.allclose(pred.embed_texts(texts), task.encode_texts(ids["input_ids"], ids["attention_mask"])[1],
                              atol=1e-6)
        assert torch.allclose(pred.embed_media(pixels[None]), task.encode_items(want[None])[2], atol=1e-6)
        vis, vmask, _ = task.encode_items(want[None])
        text, _ = task.encode_texts(ids["input_ids"][:1], ids["attention_mask"][:1])
        itm = task.itm_logits(vis, vmask, text, ids["attention_mask"][:1]).softmax(-1)[:, 1]
        assert torch.allclose(pred.itm_scores(pixels[None], texts[:1]), itm, atol=1e-6)
        # `retrieve --rerank` scores pairs as evaluation does, at the exported temperature
        logits, cos = pred.itm_logits(pixels[None], texts[:1]), torch.tensor([0.4])
        assert torch.allclose(pred.rerank_scores(logits, cos), rerank_score(logits, cos, 0.03))

    (tmp_path / "head.safetensors").unlink()                  # a caption/QA folder: seeded, untrained heads
    a, b = Predictor.load(str(tmp_path)), Predictor.load(str(tmp_path))
    assert not a.heads_trained
    assert torch.equal(a.embed_texts(texts), b.embed_texts(texts))   # embed and retrieve runs agree
