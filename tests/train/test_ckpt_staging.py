"""Staging a model and its optimizer for a checkpoint: the walks that find their tensors are planned once and
replayed, and every snapshot still holds exactly what ``state_dict()`` holds at that moment, tied weights as
aliases. A change the plan cannot have seen (a replaced parameter or optimizer state tensor, a ``.data`` swap, a
new buffer, a new or renamed module, a state-dict hook, a module's class swapped) makes the next snapshot walk
again; a model whose state dict is not plain, or an optimizer state holding Python numbers, is walked every
time."""

from __future__ import annotations

import copy

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

    def rename_module(m):              # the same child objects, in the same order, under another name
        m.out = m.tail
        del m.tail

    def persistent_again(m):
        m._non_persistent_buffers_set.discard("scratch")

    def hook(m):
        m.body[0]._register_state_dict_hook(
            lambda module, sd, prefix, meta: sd.update({prefix + "note": torch.ones(1)}))

    for change in (replace_parameter, swap_data, untie, new_buffer, new_module, rename_module, persistent_again,
                   hook):
        before = buffers._plan
        change(model)
        got, aliases = _staged(model, buffers)
        _assert_is_state_dict(got, model)
        assert ("head.weight" in aliases) == (model.head.weight is model.embed.weight), change.__name__
        assert buffers._plan is not before, change.__name__


def test_a_module_whose_class_was_swapped_walks_again():
    """The same objects under the same names, of a class whose state dict holds an entry more (extra state): the
    plan's check sees the class, so the snapshot holds that entry, and the model is walked from then on."""

    class NormWithState(nn.BatchNorm1d):
        def get_extra_state(self):
            return torch.ones(2)

        def set_extra_state(self, state):
            pass

    torch.manual_seed(0)
    model, buffers = Tied(), StagingBuffers()
    _staged(model, buffers)
    assert buffers._plan is not None
    model.body[1].__class__ = NormWithState
    got, _ = _staged(model, buffers)
    _assert_is_state_dict(got, model)
    assert "body.1._extra_state" in got and buffers._plan is None


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


# ------------------------------------------------------------------------------------------ optimizer state

def _cloned(staged: dict) -> dict:
    """A staged optimizer state dict with its tensors copied out of the (reused) staging buffers."""
    return {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in staged["state"].items()},
            "param_groups": staged["param_groups"]}


def _staged_optimizer(opt: torch.optim.Optimizer, buffers: StagingBuffers) -> dict:
    staged = buffers.stage_optimizer("trainer/optimizer", opt)
    buffers.flush()
    return _cloned(staged)


def _assert_is_optimizer_state(got: dict, opt: torch.optim.Optimizer) -> None:
    expected = opt.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    assert set(got["state"]) == set(expected["state"])
    for i, entry in expected["state"].items():
        assert set(got["state"][i]) == set(entry)
        for k, v in entry.items():
            assert torch.equal(got["state"][i][k], v), (i, k)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        model.train()(torch.randint(0, 10, (4,))).sum().backward()
        opt.step()
        opt.zero_grad()


def _lm() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3))


def test_the_optimizer_plan_is_replayed_and_each_snapshot_holds_its_moment():
    torch.manual_seed(0)
    model = _lm()
    opt, buffers = torch.optim.AdamW(model.parameters(), lr=1e-2), StagingBuffers()
    _assert_is_optimizer_state(_staged_optimizer(opt, buffers), opt)        # before the first step: no state
    _train(model, opt)
    got = _staged_optimizer(opt, buffers)                                    # the state appeared: walked again
    _assert_is_optimizer_state(got, opt)
    plan = buffers._optimizer_plans["trainer/optimizer"]
    assert plan is not None
    for step in range(3):
        _train(model, opt)
        opt.param_groups[0]["lr"] *= 0.5                                     # the groups are staged afresh
        got = _staged_optimizer(opt, buffers)
        assert buffers._optimizer_plans["trainer/optimizer"] is plan, step   # replayed
        _assert_is_optimizer_state(got, opt)
        assert got["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]


def test_a_replaced_optimizer_state_is_walked_again():
    torch.manual_seed(0)
    model = _lm()
    opt, buffers = torch.optim.AdamW(model.parameters(), lr=1e-2), StagingBuffers()
    _train(model, opt, 2)
    _staged_optimizer(opt, buffers)
    first = buffers._optimizer_plans["trainer/optimizer"]
    saved = copy.deepcopy(opt.state_dict())
    _train(model, opt)
    opt.load_state_dict(saved)                    # new tensors: the plan's sources are gone from the state
    got = _staged_optimizer(opt, buffers)
    assert buffers._optimizer_plans["trainer/optimizer"] is not first
    _assert_is_optimizer_state(got, opt)
    model[2].weight.requires_grad_(False)         # fewer parameters step from now on, over the same tensors:
    second = buffers._optimizer_plans["trainer/optimizer"]
    _train(model, opt)
    _assert_is_optimizer_state(_staged_optimizer(opt, buffers), opt)
    assert buffers._optimizer_plans["trainer/optimizer"] is second     # the plan holds


def test_an_optimizer_state_with_python_numbers_is_walked_every_time():
    class Counting(torch.optim.SGD):
        """Counts its steps in a Python int per parameter, as older optimizers did."""

        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["count"] = self.state[p].get("count", 0) + 1

    torch.manual_seed(0)
    model = _lm()
    opt, buffers = Counting(model.parameters(), lr=1e-2, momentum=0.9), StagingBuffers()
    for count in (1, 2):
        _train(model, opt)
        got = buffers.stage_optimizer("trainer/optimizer", opt)
        buffers.flush()
        assert buffers._optimizer_plans["trainer/optimizer"] is None
        assert {s["count"] for s in got["state"].values()} == {count}       # read at each snapshot


def test_an_optimizer_state_dict_of_another_layout_is_staged_whole():
    class Pair(torch.optim.AdamW):
        """A wrapper whose state dict nests two optimizers' (no top-level ``state``)."""

        def __init__(self, a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
            self.a, self.b = a, b

        def state_dict(self):
            return {"a": self.a.state_dict(), "b": self.b.state_dict()}

    torch.manual_seed(0)
    model = _lm()
    a = torch.optim.AdamW(model[:2].parameters(), lr=1e-2)
    b = torch.optim.AdamW(model[2].parameters(), lr=1e-2)
    buffers = StagingBuffers()
    for _ in range(2):
        model(torch.randint(0, 10, (4,))).sum().backward()
        a.step(), b.step()
        staged = buffers.stage_optimizer("trainer/optimizer", Pair(a, b))
        buffers.flush()
        for name, opt in (("a", a), ("b", b)):
            _assert_is_optimizer_state(_cloned(staged[name]), opt)
