"""Task heads on the tiny model: each over-fits one batch and predicts what it was taught."""

from __future__ import annotations

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.mlm import IGNORE_INDEX
from mplug2.tasks.caption import CaptionConfig, Captioner
from mplug2.tasks.classify import TextClassifier, VisualClassifier
from mplug2.tasks.grounding import BoxCodec, Grounder, GroundingConfig, generalized_iou, xywh_to_xyxy
from mplug2.tasks.qa import QAConfig, VideoQA
from mplug2.tasks.retrieval import RetrievalConfig, Retriever, evaluate_retrieval, rerank_score
from mplug2.tokenizer import load_tokenizer
from tests.tiny import distinct_pixels, one_thread, tok  # noqa: F401  (fixtures)


def tiny_model(seed: int = 0) -> MPLUG2:
    torch.manual_seed(seed)
    return MPLUG2(MPLUG2Config.preset("tiny"))


def train(module, batch, steps: int, lr: float = 2e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        out = module(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if hasattr(module, "momentum_update"):
            module.momentum_update()
        losses.append(out["loss"].item())
    return losses


def test_captioner_masks_prompt_and_learns_captions(tok):
    cap = Captioner(tiny_model(), tok, CaptionConfig(prompt="a video of", num_beams=2, max_length=5))
    captions = ["the dog", "a cat is playing"]
    enc = tok(captions, max_length=12)
    ids, mask, labels = cap.targets(enc["input_ids"], enc["attention_mask"])
    p = 1 + len(tok.encode("a video of"))
    assert (labels[:, :p] == IGNORE_INDEX).all() and (labels[mask == 0] == IGNORE_INDEX).all()
    assert ids[0, 1:p].tolist() == tok.encode("a video of")
    batch = {"pixels": distinct_pixels(2), **enc}
    losses = train(cap, batch, 60)
    assert losses[-1] < 0.1 * losses[0]
    assert cap.predict(batch["pixels"]) == captions  # the prompt is stripped from the output


def test_qa_weighted_answers_generation_and_rank_answer(tok):
    qa = VideoQA(tiny_model(1), tok, QAConfig(num_beams=2, max_length=4, k_test=3))
    q = tok(["what is the man playing", "what is in the video"], max_length=12)
    answers = ["cat", "dog", "man"]
    a = tok(answers, max_length=6)
    batch = {"pixels": distinct_pixels(2), **q, "answer_ids": a["input_ids"][:2], "answer_mask": a["attention_mask"][:2]}
    # weights and multiple answers per question: sum_i w_i * loss_i / B
    multi = dict(batch, answer_ids=a["input_ids"], answer_mask=a["attention_mask"],
                 answer_index=torch.tensor([0, 1, 1]), answer_weights=torch.tensor([1.0, 0.5, 0.0]))
    per = qa.model.decode(a["input_ids"], a["attention_mask"],
                          *[t[torch.tensor([0, 1, 1])] for t in qa.memory(batch["pixels"], q["input_ids"],
                                                                           q["attention_mask"])],
                          labels=a["input_ids"].masked_fill(a["attention_mask"] == 0, -100), reduction="none").loss
    torch.testing.assert_close(qa(multi)["loss"], (per[0] + 0.5 * per[1]) / 2)
    losses = train(qa, batch, 60)
    assert losses[-1] < 0.1 * losses[0]
    assert qa.predict(batch["pixels"], q["input_ids"], q["attention_mask"]) == ["cat", "dog"]
    ranked = qa.rank_answer(batch["pixels"], q["input_ids"], q["attention_mask"], a["input_ids"],
                            a["attention_mask"], k=2)
    assert ranked.best.tolist() == [0, 1] and ranked.candidates.shape == (2, 2)
    torch.testing.assert_close(ranked.probs.sum(1), torch.ones(2))


def test_box_tokens_round_trip_within_one_bin(tok):
    codec = BoxCodec.from_tokenizer(tok, GroundingConfig.tiny(), image_res=32)
    assert codec.num_bins == 33 and codec.prefix_id == tok.convert_tokens_to_ids("[unused8]")
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(200, 4, generator=g) * 32
    ids = codec.encode(boxes)
    assert ((ids >= codec.first_bin_id) & (ids < codec.first_bin_id + 33)).all()
    assert ((codec.decode(ids) - boxes).abs() <= codec.step / 2 + 1e-6).all()
    bert = load_tokenizer()
    big = BoxCodec.from_tokenizer(bert, GroundingConfig(), image_res=224)
    assert big.prefix_id == bert.convert_tokens_to_ids("[unused339]") and big.num_bins == 225
    with pytest.raises(ValueError, match="grounding tokens"):
        BoxCodec.from_tokenizer(tok, GroundingConfig(), image_res=32)  # BERT layout on the tiny vocab


def test_giou():
    a = xywh_to_xyxy(torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]]))
    b = xywh_to_xyxy(torch.tensor([[0.0, 0, 2, 2], [2, 0, 1, 1]]))
    torch.testing.assert_close(generalized_iou(a, b), torch.tensor([1.0, -1 / 3]))


def test_grounding_learns_boxes_and_decodes_only_box_tokens(tok):
    gr = Grounder(tiny_model(2), tok, GroundingConfig.tiny())
    enc = tok(["the dog on the cat", "a man"], max_length=12)
    boxes = torch.tensor([[3.0, 5.0, 10.0, 12.0], [20.0, 1.0, 8.0, 30.0]])
    batch = {"pixels": distinct_pixels(2), **enc, "boxes": boxes}
    seen = []
    orig = gr.model.generate

    def spy(*a, **k):
        seqs = orig(*a, **k)
        seen.extend(seqs)
        return seqs
    gr.model.generate = spy
    before = gr.predict(batch["pixels"], enc["input_ids"], enc["attention_mask"])
    assert before.shape == (2, 4)
    assert all(len(s) == 4 and all(t in gr.codec.bin_ids for t in s) for s in seen)
    train(gr, batch, 80, lr=3e-3)
    pred = gr.predict(batch["pixels"], enc["input_ids"], enc["attention_mask"])
    assert ((pred - boxes).abs() <= gr.codec.step).all(), pred


def test_classifiers_overfit(tok):
    vc = VisualClassifier(tiny_model(3), num_classes=3)
    batch = {"pixels": distinct_pixels(4), "labels": torch.tensor([0, 1, 2, 1])}
    losses = train(vc, batch, 40, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0]
    assert vc.predict(batch["pixels"]).tolist() == [0, 1, 2, 1]
    tc = TextClassifier(tiny_model(4), num_classes=2, dropout=0.0)
    enc = tok(["a dog", "a cat", "the man", "the woman"], max_length=8)
    batch = {**enc, "labels": torch.tensor([0, 1, 0, 1])}
    losses = train(tc, batch, 40, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0]
    assert tc.predict(enc["input_ids"], enc["attention_mask"]).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        VisualClassifier(tiny_model(), num_classes=1)


def test_retrieval_finetune_then_rerank_recovers_pairs(tok):
    ret = Retriever(tiny_model(5), tok, RetrievalConfig(k_test=3, queue_size=0, distill=False))
    caps = ["a man playing", "the dog is on a cat", "a woman in the video", "what is the person playing"]
    enc = tok(caps, max_length=12)
    batch = {"pixels": distinct_pixels(4), **enc, "ids": torch.arange(4)}
    losses = train(ret, batch, 150, lr=1e-3)
    assert losses[-1] < 0.1 * losses[0]
    scores = ret.predict(batch["pixels"], enc["input_ids"], enc["attention_mask"], k=3)
    assert scores.itc_i2t.shape == scores.i2t.shape == (4, 4) and scores.t2i.shape == (4, 4)
    assert (torch.isneginf(scores.i2t).sum(1) == 1).all()  # k=3 of 4 re-ranked per row
    metrics = evaluate_retrieval(ret, batch["pixels"], enc["input_ids"], enc["attention_mask"], [0, 1, 2, 3], k=3)
    assert metrics["txt_r1"] == metrics["img_r1"] == 100.0 and metrics["itc_txt_r1"] == 100.0
    # ITM on each caption's own clip against ITC's two nearest wrong clips: the trained head ranks its own first
    assert metrics["itm_hard_pair_acc"] == 100.0 and 0.0 <= metrics["itm_hard_acc"] <= 100.0


def test_rerank_score_keeps_itc_order_under_a_flat_itm_head_and_combines_both_heads_on_one_scale():
    sim, temp = torch.tensor([0.62, 0.60, 0.55]), 0.05
    flat = torch.tensor([[0.3, -1.0]] * 3)                      # an ITM head that says the same for every pair
    assert rerank_score(flat, sim, temp).argsort(descending=True).tolist() == [0, 1, 2]
    # the raw "ITM logit + cosine" lets a small ITM wobble (0.1) override the ITC order; on the log scale the
    # ITC logit gap (0.4) needs a real ITM preference to be overturned
    wobble = torch.tensor([[0.0, 0.0], [0.0, 0.1], [0.0, 0.0]])
    assert (wobble[:, 1] + sim).argmax() == 1 and rerank_score(wobble, sim, temp).argmax() == 0
    sure = torch.tensor([[3.0, -3.0], [-3.0, 3.0], [0.0, 0.0]])
    assert rerank_score(sure, sim, temp).argmax() == 1
    # = log of the product of the ITC softmax and the ITM match probability, up to one constant per query
    p = torch.softmax(sim / temp, 0) * torch.softmax(sure, -1)[:, 1]
    torch.testing.assert_close(rerank_score(sure, sim, temp) - p.log(), torch.full((3,), float(
        (rerank_score(sure, sim, temp) - p.log())[0])))
