"""A worker's batch crosses to the trainer with its small tensors inside the pickle, its pixels in shared memory."""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions on ForkingPickler, as a worker has)

from mplug2.data.handoff import BY_VALUE_MAX_BYTES, small_by_value
from mplug2.data.loader import build_loader
from tests.data.test_loader import _cfg, _tokenize


def _through_worker_pickle(obj):
    """What the trainer unpickles from a DataLoader worker's result queue."""
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return pickle.loads(buf.getvalue())


@pytest.mark.parametrize("t", [
    torch.arange(12, dtype=torch.int64).reshape(3, 4),
    torch.tensor([True, False, True]),
    torch.randn(5, 3).to(torch.bfloat16),
    torch.tensor(7.5),                                   # 0-dim
    torch.empty(0, 4, dtype=torch.float32),              # no elements
    torch.arange(20, dtype=torch.float32).reshape(4, 5).t(),    # not contiguous
], ids=["int64", "bool", "bfloat16", "scalar", "empty", "transposed"])
def test_small_tensors_arrive_as_equal_plain_tensors(t):
    got = _through_worker_pickle(small_by_value({"x": t, "n": 3}))
    assert type(got["x"]) is torch.Tensor and got["n"] == 3
    assert got["x"].dtype == t.dtype and got["x"].shape == t.shape and torch.equal(got["x"], t)
    assert not got["x"].is_shared()


def test_large_tensors_still_cross_through_shared_memory():
    big = torch.zeros(BY_VALUE_MAX_BYTES // 4 + 1, dtype=torch.float32)
    out = small_by_value({"pixels": big})
    assert out["pixels"] is big


def test_worker_batches_equal_in_process_ones_and_only_pixels_use_shared_memory(image_shards):
    """Two worker processes against none: the same batches, value for value; from the workers, the pixels
    (megabytes) arrive in shared memory and the token ids, masks and sample ids (bytes) inside the pickle."""
    cfg = dict(res=160)                                   # 4 x 3 x 160 x 160 float32: past the by-value bound
    workers = build_loader(_cfg(image_shards.prefix, **cfg), tokenize=_tokenize)
    inline = build_loader(_cfg(image_shards.prefix, num_workers=0, **cfg), tokenize=_tokenize)
    try:
        for _ in range(3):
            a, b = next(workers), next(inline)
            assert a.keys() == b.keys() and a["keys"] == b["keys"]
            for k, v in a.items():
                if isinstance(v, torch.Tensor):
                    assert type(v) is torch.Tensor and v.dtype == b[k].dtype and torch.equal(v, b[k]), k
                    assert v.is_shared() == (v.numel() * v.element_size() > BY_VALUE_MAX_BYTES), k
            assert a["pixels"].is_shared() and not a["input_ids"].is_shared()
    finally:
        workers.close()
        inline.close()
