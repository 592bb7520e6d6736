"""The checkpoint writer's safetensors files: what safetensors itself reads back, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file

from mplug2.train.checkpoint.tensorfile import tensor_file_bytes, write_tensor_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=g),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "step": torch.tensor(41.0),                     # AdamW's scalar step
        "empty": torch.empty(0, 4),
        "bytes": torch.arange(5, dtype=torch.uint8),    # odd sizes after wider types: offsets stay aligned
        "f16": torch.randn(2, 3, generator=g).half(),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_file_and_bytes_read_back_by_safetensors_with_metadata(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    write_tensor_file(str(path), tensors, {"format": "pt", "aliases": '{"b": "a"}'})
    _assert_same(st_load_file(str(path)), tensors)
    raw = tensor_file_bytes(tensors, {"format": "pt", "aliases": '{"b": "a"}'})
    assert raw == path.read_bytes()
    _assert_same(st_load(raw), tensors)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "aliases": '{"b": "a"}'}
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0                           # the data starts aligned


def test_empty_dict_and_no_metadata(tmp_path):
    path = tmp_path / "e.safetensors"
    write_tensor_file(str(path), {})
    assert st_load_file(str(path)) == {}


def test_refuses_a_non_contiguous_tensor_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="'t'.*contiguous"):
        write_tensor_file(str(tmp_path / "x"), {"t": torch.randn(4, 3).t()})
