"""Staging a model for a checkpoint: the walk that finds its tensors is planned once and replayed, and every
snapshot still holds exactly what ``state_dict()`` holds at that moment, tied weights as aliases. A change the
plan cannot have seen (a replaced parameter, a ``.data`` swap, a new buffer, module or state-dict hook) makes
the next snapshot walk again; a model whose state dict is not plain is walked every time."""

from __future__ import annotations

import torch
from torch import nn

from mplug2.train.checkpoint import StagingBuffers


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight                     # tied: one storage, two names
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def _staged(model: nn.Module, buffers: StagingBuffers) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, aliases = buffers.stage_model(model)
    buffers.flush()
    return {name: tensors[aliases.get(name, name)].clone() for name in [*tensors, *aliases]}, aliases


def _assert_is_state_dict(got: dict[str, torch.Tensor], model: nn.Module) -> None:
    expected = model.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_the_plan_is_replayed_and_each_snapshot_holds_its_moment():
    torch.manual_seed(0)
    model, buffers = Tied(), StagingBuffers()
    got, aliases = _staged(model, buffers)
    _assert_is_state_dict(got, model)
    assert aliases == {"head.weight": "embed.weight"}
    plan = buffers._plan
    assert plan is not None
    for step in range(3):                                    # training moves the weights and the running stats
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 + step)
        model.body.train()(torch.randn(4, 8))
        got, aliases = _staged(model, buffers)
        assert buffers._plan is plan                         # replayed, not walked again
        _assert_is_state_dict(got, model)
        assert aliases == {"head.weight": "embed.weight"}


def test_a_change_the_plan_has_not_seen_walks_again():
    torch.manual_seed(0)
    model, buffers = Tied(), StagingBuffers()
    _staged(model, buffers)

    def replace_parameter(m):
        m.body[0].weight = nn.Parameter(torch.randn(8, 8))

    def swap_data(m):
        m.body[0].bias.data = torch.randn(8)

    def untie(m):
        m.head.weight = nn.Parameter(m.embed.weight.detach().clone() + 1)

    def new_buffer(m):
        m.body[1].register_buffer("extra", torch.arange(4.0))

    def new_module(m):
        m.tail = nn.Linear(10, 2)

    def persistent_again(m):
        m._non_persistent_buffers_set.discard("scratch")

    def hook(m):
        m.body[0]._register_state_dict_hook(
            lambda module, sd, prefix, meta: sd.update({prefix + "note": torch.ones(1)}))

    for change in (replace_parameter, swap_data, untie, new_buffer, new_module, persistent_again, hook):
        before = buffers._plan
        change(model)
        got, aliases = _staged(model, buffers)
        _assert_is_state_dict(got, model)
        assert ("head.weight" in aliases) == (model.head.weight is model.embed.weight), change.__name__
        assert buffers._plan is not before, change.__name__


def test_a_model_whose_state_dict_is_not_plain_is_walked_every_time():
    class Counted(nn.Linear):
        """Adds a tensor of its own to its state dict: what it holds is known only by asking."""

        def __init__(self) -> None:
            super().__init__(4, 4)
            self.calls = 0

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            self.calls += 1
            destination[prefix + "calls"] = torch.tensor(self.calls)

    model, buffers = nn.Sequential(Counted(), nn.Linear(4, 2)), StagingBuffers()
    for calls in (1, 2):
        got, _ = _staged(model, buffers)
        assert buffers._plan is None
        assert int(got["0.calls"]) == calls                # asked for at each snapshot


def test_shared_buffers_are_carved_from_few_segments(monkeypatch):
    """Thousands of state tensors (Base pretraining with AdamW has ~5,000) take one shared segment, one open
    file descriptor and one handle to the writer per segment, not per tensor; no two buffers overlap, and
    a buffer larger than a segment gets one of its own."""
    import os

    from mplug2.train.checkpoint import staging

    monkeypatch.setattr(staging, "SEGMENT_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(staging, "SEGMENT_MAX_BYTES", 1 << 20)
    fds = len(os.listdir("/proc/self/fd"))
    buffers = StagingBuffers(shared=True)
    dtypes = (torch.float32, torch.bfloat16, torch.int64)
    sources = {f"t{i}": torch.full((i % 7 + 1, 3), float(i), dtype=dtypes[i % 3]) for i in range(3000)}
    sources["big"] = torch.arange(600_000, dtype=torch.float32)          # 2.4 MiB: its own segment
    sources["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    staged = {k: buffers.copy(k, t) for k, t in sources.items()}
    buffers.flush()
    segments, views = buffers.take_new()
    assert 1 < len(segments) <= 4 and len(os.listdir("/proc/self/fd")) - fds <= len(segments)
    assert set(views) == set(sources) and buffers.take_new() == ({}, {})
    for key, t in sources.items():
        assert torch.equal(staged[key], t) and staged[key].dtype == t.dtype, key
        assert torch.equal(staging.segment_view(segments[views[key][0]], *views[key][1:]), t), key
    big = views["big"][0]
    assert segments[big].numel() == sources["big"].numel() * 4 and sum(v[0] == big for v in views.values()) == 1
    buffers.resend_all()                                  # a new writer process gets everything again
    again_segments, again_views = buffers.take_new()
    assert again_segments.keys() == segments.keys() and again_views == views
