"""The DataLoader-level cursor: resume in a fresh loader (with worker processes) is exact."""

from __future__ import annotations

import zlib

import pytest
import torch

from mplug2.data.loader import LoaderConfig, build_loader


def _tokenize(texts, max_length):
    """A tiny deterministic tokenizer (the loader accepts any callable with this signature)."""
    ids = [[101] + [1000 + zlib.crc32(w.encode()) % 5000 for w in t.split()][: max_length - 2] + [102] for t in texts]
    L = max(map(len, ids))
    return {"input_ids": torch.tensor([i + [0] * (L - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])}


def _cfg(prefix, **kw):
    base = dict(prefix=prefix, corpus="img", batch_size=4, num_workers=2, streams_per_rank=2, res=16,
                shards_in_flight=2, shuffle_buffer=6, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


def _run(loader, n):
    keys, states = [], []
    for _ in range(n):
        b = next(loader)
        keys.append(b["keys"])
        states.append(loader.state_dict())
    return keys, states


@pytest.fixture(scope="module")
def reference(image_shards):
    """An uninterrupted run over two epochs, with 2 worker processes, and its state after every batch."""
    loader = build_loader(_cfg(image_shards.prefix), tokenize=_tokenize)
    per_epoch = loader.steps_per_epoch
    keys, states = _run(loader, 2 * per_epoch + 3)
    loader.close()
    return keys, states, per_epoch


def test_batches_have_the_documented_layout(image_shards, reference):
    loader = build_loader(_cfg(image_shards.prefix, num_workers=0), tokenize=_tokenize)
    b = next(loader)
    assert b["pixels"].shape == (4, 3, 1, 16, 16) and b["pixels"].dtype == torch.float32
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].dtype == torch.long
    assert b["ids"].tolist() == [int(k[:6]) * 1_000_000 + int(k[7:]) for k in b["keys"]]
    assert b["corpus"] == "img" and len(b["captions"]) == 4
    assert all(c == c.lower() and "," not in c for c in b["captions"])
    # physical worker count does not change the order (streams_per_rank fixes it)
    keys, _, _ = reference
    assert [b["keys"]] + [next(loader)["keys"] for _ in range(4)] == keys[:5]


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
@pytest.mark.parametrize("num_workers", [2, 0])
def test_exact_resume_in_fresh_loader(image_shards, reference, where, num_workers):
    keys, states, per_epoch = reference
    k = 5 if where == "mid_epoch" else per_epoch            # batches consumed before the "crash"
    state = states[k - 1]
    assert (state["epoch"], state["batches"]) == ((0, 5) if where == "mid_epoch" else (1, 0))
    resumed = build_loader(_cfg(image_shards.prefix, num_workers=num_workers), tokenize=_tokenize)
    resumed.load_state_dict(state)
    got, _ = _run(resumed, 4)
    resumed.close()
    assert got == keys[k:k + 4]


def test_dropping_the_cursor_changes_the_stream(image_shards, reference):
    keys, states, _ = reference
    fresh = build_loader(_cfg(image_shards.prefix), tokenize=_tokenize)   # negative control: no load_state_dict
    got, _ = _run(fresh, 3)
    fresh.close()
    assert got != keys[5:8]


def test_state_from_another_configuration_is_refused(image_shards, reference):
    _, states, _ = reference
    other = build_loader(_cfg(image_shards.prefix, batch_size=3, num_workers=0), tokenize=_tokenize)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(states[3])
    resized = build_loader(_cfg(image_shards.prefix, num_workers=0, streams_per_rank=1), rank=1, world_size=2,
                           tokenize=_tokenize)
    with pytest.raises(ValueError, match="does not match"):
        resized.load_state_dict(states[3])
