"""Importing the released mPLUG-2 checkpoints: a small-config file in the release's layout (momentum twins, unused
tensors, tied copies, 4 allocated fusion layers of which 2 run) imports into a model whose outputs equal a model
built directly from the same tensors; bad files fail with one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mplug2.cli import main
from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.official import KNOWN_NEW, map_official_keys
from tests.official_layout import CLIP_TEXT_LARGE, release_layout, release_state_dict
from tests.tiny import one_thread  # noqa: F401  (fixture)


def _cfg() -> MPLUG2Config:
    cfg = MPLUG2Config.preset("tiny")
    cfg.vision.image_mode = "centre"
    return cfg


def _release_file(tmp_path, task: str, dtype=torch.float32, wrapper: str = "model", name: str = "ckpt.pth"):
    cfg = _cfg()
    torch.manual_seed(0)
    ref = MPLUG2(cfg).eval()
    ours = ref.state_dict()
    layout = release_layout(cfg, task, fusion_allocated=4)
    sd = release_state_dict(layout, dtype, fill=lambda k, shape: ours[k].clone())
    path = tmp_path / name
    torch.save({wrapper: sd, "epoch": 4, "config": {"lr": 1e-5}}, path)   # plain containers pass weights_only
    return path, ref, layout


def _cfg_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    _cfg().to_yaml(path)
    return str(path)


def _outputs(model: MPLUG2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 4, 32, 32, generator=g)
    image = torch.randn(2, 3, 1, 32, 32, generator=g)
    ids = torch.randint(5, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        vis, vmask = model.encode_vision(pixels)
        img, _ = model.encode_vision(image)
        mem, mem_mask = model.fused_memory(pixels, ids, mask)
        return {"vision": vis, "image": img, "memory": mem,
                "caption_logits": model.decode(ids, mask, vis, vmask).logits,
                "qa_logits": model.decode(ids, mask, mem, mem_mask).logits}


@pytest.mark.parametrize("task,dtype,wrapper", [("caption", torch.float32, "model"), ("qa", torch.float16, "module")])
def test_release_layout_imports_into_a_model_equal_to_the_source_tensors(tmp_path, capsys, task, dtype, wrapper):
    path, ref, layout = _release_file(tmp_path, task, dtype, wrapper)
    out = tmp_path / "imported"
    assert main(["import-official", str(path), "--task", task, "--out", str(out),
                 "--config", _cfg_yaml(tmp_path)]) == 0
    assert "tied pairs checked equal" in capsys.readouterr().out
    model = MPLUG2.from_pretrained(out).eval()
    assert model.config.vision.image_mode == "centre"

    # "built directly from the same tensors": the reference with its weights rounded to the file's dtype
    direct = MPLUG2(_cfg()).eval()
    direct.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
    got, want = _outputs(model), _outputs(direct)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    report = json.loads((out / "import_report.json").read_text())
    official = {name for name, _, _ in layout}
    assert set(report["mapped"]) | set(report["dropped"]) == official          # every tensor accounted for
    assert not set(report["mapped"]) & set(report["dropped"])
    assert {report["mapped"][n] for n, _, o in layout if o} == {o for _, _, o in layout if o}
    assert all(report["mapped"][n] == o for n, _, o in layout if o)
    assert sorted(report["new"]) == sorted(KNOWN_NEW)
    assert report["fusion_allocated"] == 4 and report["fusion_offset"] == 2
    assert sorted(report["tied_checked"]) == ["text_decoder.cls.predictions.decoder.bias",
                                              "text_decoder.cls.predictions.decoder.weight"]
    twins = [n for n in report["dropped"] if n.split(".")[0].endswith("_m")]
    assert len(twins) == (len(official) // 2 if task == "qa" else 0)


def test_large_layout_matches_the_release_key_counts():
    """The Large layout has the release's 2223 (caption) / 4446 (QA) keys, and 1569 of them map (design facts)."""
    cfg = MPLUG2Config.preset("large")
    for task, total in (("caption", 2223), ("qa", 4446)):
        layout = release_layout(cfg, task, fusion_allocated=24, clip_text=CLIP_TEXT_LARGE)
        assert len(layout) == total
        mapped, dropped, allocated, offset = map_official_keys([n for n, _, _ in layout], cfg)
        assert (len(mapped), allocated, offset) == (1569, 24, 18)
        assert mapped == {n: o for n, _, o in layout if o}


def _fails_with_one_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_files_fail_with_one_clear_line(tmp_path, capsys):
    cfg = _cfg_yaml(tmp_path)
    path, _, _ = _release_file(tmp_path, "qa", name="qa.pth")
    cases = {}
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2),
                "bert.encoder.layer.0.output.dense.weight": torch.zeros(2, 2)}, tmp_path / "bert.bin")
    cases["bert.bin"] = ("BERT checkpoint", "convert --bert")
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 2, 2), "transformer.resblocks.0.ln_1.weight": torch.zeros(2)},
               tmp_path / "clip.pt")
    cases["clip.pt"] = ("CLIP checkpoint",)
    data = path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    cases["truncated.pth"] = ("not a readable torch checkpoint", "truncated")
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, tmp_path / "objects.pth")
    cases["objects.pth"] = ("weights-only loader",)
    torch.save({"model": {"encoder.blocks.0.weight": torch.zeros(2), "visual_encoder.foo": torch.zeros(2)}},
               tmp_path / "other.pth")
    cases["other.pth"] = ("not an mPLUG-2 release", "encoder.blocks.0.weight")
    for name, needles in cases.items():
        _fails_with_one_line(capsys, ["import-official", str(tmp_path / name), "--task", "caption",
                                      "--out", str(tmp_path / "o"), "--config", cfg], *needles)
    _fails_with_one_line(capsys, ["import-official", str(path), "--task", "caption", "--out", str(tmp_path / "o"),
                                  "--config", cfg], "--task qa")
    _fails_with_one_line(capsys, ["import-official", str(tmp_path / "missing.pth"), "--task", "qa",
                                  "--out", str(tmp_path / "o"), "--config", cfg], "no such file")
    # The tiny file is not a Large model: shapes say so, and how to fix it.
    _fails_with_one_line(capsys, ["import-official", str(path), "--task", "qa", "--out", str(tmp_path / "o")],
                         "--config")
    assert not (tmp_path / "o" / "model.safetensors").exists()
