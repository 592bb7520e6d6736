"""Shared helpers for tests that train the ``tiny`` preset in-process (objectives and task heads).

Import the fixtures into a test module to use them: ``from tests.tiny import distinct_pixels, one_thread, tok``.
"""

from __future__ import annotations

import pytest
import torch

from mplug2.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are dominated by thread hand-offs on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def distinct_pixels(b: int, t: int = 2) -> torch.Tensor:
    """Clearly different clips (colour + split position), so a tiny encoder can tell them apart quickly."""
    px = torch.zeros(b, 3, t, 32, 32)
    for i in range(b):
        px[i, i % 3] = 2.0
        px[i, :, :, : 8 * (i % 4 + 1)] *= -1
    return px


def fit_batch(module: torch.nn.Module, batch: dict, steps: int, keys: tuple[str, ...], lr: float) -> list[dict]:
    """Train ``module`` (a pretrainer: ``param_groups``, ``momentum_update``) on one batch with AdamW; returns
    the ``keys`` of its outputs at every step."""
    opt = torch.optim.AdamW(module.param_groups(lr, lr, 0.0))
    hist = []
    for _ in range(steps):
        out = module(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        module.momentum_update()
        hist.append({k: out[k].item() for k in keys})
    return hist
