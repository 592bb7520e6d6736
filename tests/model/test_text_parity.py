"""Text encoder == transformers BertModel (model-spec 3.2, 9): real MiniLM weights and a bert.-prefixed MLM dict."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from mplug2.config import TextConfig
from mplug2.models.mplug2 import MPLUG2
from mplug2.tokenizer import default_vocab_dir, load_tokenizer
from mplug2.weights import load_pretrained, read_state_dict

from .helpers import padded_batch, tiny, with_text

ATOL = 1e-5


def _close_at(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@pytest.fixture(scope="module")
def minilm():
    path = default_vocab_dir()
    ref = BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager").eval()
    hf = ref.config
    text = TextConfig(vocab_size=hf.vocab_size, hidden=hf.hidden_size, layers=hf.num_hidden_layers,
                      heads=hf.num_attention_heads, intermediate=hf.intermediate_size,
                      max_positions=hf.max_position_embeddings, hidden_dropout=0.0, attn_dropout=0.0)
    cfg = with_text(tiny(decoder__bos_token_id=101, decoder__eos_token_id=102, tokenizer="bert-base-uncased"), text)
    torch.manual_seed(0)
    model = MPLUG2(cfg).eval()
    report = load_pretrained(model, bert=read_state_dict(path))
    return ref, model, report


def test_minilm_hidden_states_match_bertmodel_on_padded_batch(minilm):
    ref, model, _ = minilm
    tok = load_tokenizer()
    enc = tok(["A man is playing a guitar.", "Someone plays an instrument on a small stage tonight.", "hi"],
              max_length=32)
    assert enc["attention_mask"].sum(1).tolist() != [enc["input_ids"].shape[1]] * 3  # the batch really is padded
    with torch.no_grad():
        ours = model.encode_text(enc["input_ids"], enc["attention_mask"])
        theirs = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert _close_at(ours, theirs, enc["attention_mask"]) < ATOL


def test_minilm_provenance_fusion_and_decoder_layers(minilm):
    ref, model, report = minilm
    n, f = 6, model.config.fusion.layers
    for j in range(f):
        assert report.loaded[f"fusion.layer.{j}.attention.self.query.weight"] == \
            f"bert:encoder.layer.{n - f + j}.attention.self.query.weight"
        assert torch.equal(model.fusion.layer[j].output.dense.weight, ref.encoder.layer[n - f + j].output.dense.weight)
    for i in range(model.config.decoder.layers):
        assert torch.equal(model.decoder.layer[i].intermediate.dense.weight,
                           ref.encoder.layer[i].intermediate.dense.weight)
    new = report.new_modules()
    for expected in ["text.latents", "text.layer.4.crossattention", "text.layer.5.crossattention",
                     "fusion.layer.0.crossattention", "decoder.layer.1.crossattention", "text.visn_norm",
                     "mlm_head.transform", "decoder.lm_head.transform"]:
        assert expected in new, (expected, new)
    assert "embeddings.position_ids" in report.dropped or not any("position_ids" in k for k in report.loaded)
    assert not any(k.startswith("text.layer.0.attention") for k in report.new)


def test_bert_prefixed_mlm_dict_gives_same_hidden_states_and_mlm_logits():
    hf = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    ref = BertForMaskedLM(hf).eval()
    with torch.no_grad():  # non-trivial LN/bias values so a dropped or mis-mapped tensor shows
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    sd = ref.state_dict()
    assert any(k.startswith("bert.") for k in sd) and "cls.predictions.transform.dense.weight" in sd
    # legacy gamma/beta names must load too
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in sd.items()}
    model = MPLUG2(tiny()).eval()
    report = load_pretrained(model, bert=sd)
    ids, mask = padded_batch(128, [9, 4, 7])
    with torch.no_grad():
        t = model.encode_text(ids, mask)
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert _close_at(t, out.hidden_states[-1], mask) < ATOL
        assert _close_at(model.mlm_logits(t), out.logits, mask) < ATOL
    assert "mlm_head.transform" not in report.new_modules()
    assert torch.equal(model.decoder.lm_head.bias, ref.cls.predictions.bias)


def test_bert_dict_with_unknown_key_fails_loudly():
    model = MPLUG2(tiny())
    hf = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
    sd = BertModel(hf).state_dict()
    sd["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_pretrained(model, bert=sd)
