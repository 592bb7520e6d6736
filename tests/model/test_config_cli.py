"""Presets, YAML round trip, validation, parameter counts (meta device) and the ``mplug2-model`` CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mplug2.cli import count_parameters, main
from mplug2.config import MPLUG2Config
from mplug2.tokenizer import load_tokenizer, tiny_vocab

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_preset_yaml_round_trip_and_shipped_yaml(name, tmp_path):
    cfg = MPLUG2Config.preset(name)
    cfg.to_yaml(tmp_path / "m.yaml")
    assert MPLUG2Config.from_yaml(tmp_path / "m.yaml") == cfg
    assert MPLUG2Config.from_yaml(REPO / "configs" / "model" / f"{name}.yaml") == cfg


def test_from_dict_preset_with_overrides_and_unknown_keys():
    cfg = MPLUG2Config.from_dict({"preset": "tiny", "vision": {"image_mode": "repeat"}, "beam": 3})
    assert cfg.vision.image_mode == "repeat" and cfg.beam == 3 and cfg.vision.width == 32
    with pytest.raises(ValueError, match="unknown keys"):
        MPLUG2Config.from_dict({"preset": "tiny", "text": {"hiden": 3}})
    with pytest.raises(ValueError, match="unknown MPLUG2Config keys"):
        MPLUG2Config.from_dict({"preset": "tiny", "queue": 3})


@pytest.mark.parametrize("section,field,value,match", [
    ("text", "num_uni_layer", 3, "num_uni_layer must be 2"),
    ("text", "num_uni_layer", 1, "num_uni_layer must be 2"),
    ("text", "heads", 5, "does not divide text.hidden"),
    ("vision", "heads", 3, "does not divide vision.width"),
    ("vision", "patch_size", 5, "does not divide image_res"),
    ("vision", "image_mode", "video", "image_mode"),
    ("decoder", "eos_token_id", 500, "outside vocab"),
])
def test_validate_rejects_bad_configs(section, field, value, match):
    cfg = MPLUG2Config.preset("tiny")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_large_is_about_0_9b_and_base_smaller_on_meta_device():
    large = count_parameters(MPLUG2Config.preset("large"))
    base = count_parameters(MPLUG2Config.preset("base"))
    total_l, total_b = sum(large.values()), sum(base.values())
    assert 0.85e9 < total_l < 1.1e9, total_l  # README: "0.9B"; we count the decoder's own embeddings
    assert 0.3e9 < total_b < 0.45e9, total_b
    # CLIP ViT-L/14 (~303M) + LT modules (2 per block) in the vision tower
    assert 0.33e9 < large["vision"] < 0.37e9


def test_cli_params_prints_modules_and_total(capsys):
    assert main(["params", "--preset", "large"]) == 0
    out = capsys.readouterr().out
    for name in ("vision", "text", "fusion", "decoder", "mlm_head", "total"):
        assert name in out
    total = sum(count_parameters(MPLUG2Config.preset("large")).values())
    assert f"{total:,}" in out
    with pytest.raises(SystemExit):
        main(["params", "--preset", "huge"])


def test_cli_convert_writes_a_loadable_folder(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from mplug2.models.mplug2 import MPLUG2

    hf = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "bert.safetensors"))
    assert main(["convert", "--preset", "tiny", "--bert", str(tmp_path / "bert.safetensors"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "new" in capsys.readouterr().out
    model = MPLUG2.from_pretrained(tmp_path / "out")
    assert torch.equal(model.text.layer[2].output.dense.weight, hf.encoder.layer[2].output.dense.weight)


def test_tokenizers_match_presets():
    tok = load_tokenizer()
    assert tok.vocab_size == MPLUG2Config.preset("base").text.vocab_size == 30522
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id) == (101, 102, 0, 103)
    assert load_tokenizer("bert-large-uncased").vocab_size == 30522
    enc = tok(["a man is playing a guitar", "hi"], max_length=6)
    assert enc["input_ids"].shape == (2, 6) and enc["input_ids"][0, 0] == 101
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert tok.decode(enc["input_ids"][0]) == "a man is playing"
    cfg = MPLUG2Config.preset("tiny")
    tt = load_tokenizer(cfg.tokenizer)
    assert tt.vocab_size == cfg.text.vocab_size == len(tiny_vocab()) == 128
    assert (tt.cls_token_id, tt.sep_token_id) == (cfg.decoder.bos_token_id, cfg.decoder.eos_token_id)
    assert tt.pad_token_id == 0
    v = tiny_vocab()
    bins = [f"[unused{i}]" for i in range(9, 42)]
    assert all(b in v for b in bins) and "[unused8]" in v
    assert tt.decode(tt(["the dog is playing"], max_length=12)["input_ids"][0]) == "the dog is playing"


def test_tokenizer_folder_without_vocab_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(str(tmp_path))
