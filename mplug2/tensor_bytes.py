"""A CPU tensor as plain bytes, for pickles that must carry it by value.

``torch.multiprocessing``'s pickling of a tensor moves its storage into a shared-memory segment of its own and
hands over a file descriptor; ``torch.save``-style pickling of an ``UntypedStorage`` does not load again. For a
few bytes (RNG states, token ids, masks) a copy inside the pickle is cheaper than either, and this is that copy.
Used by the checkpoint writer's messages and the loader's worker-to-trainer hand-off.
"""

from __future__ import annotations

import torch

__all__ = ["tensor_from_bytes", "tensor_reduction"]


def tensor_reduction(t: torch.Tensor) -> tuple:
    """``(tensor_from_bytes, args)``: a ``__reduce__`` value that rebuilds a copy of ``t`` from its bytes (any
    dtype, any layout; the copy is contiguous)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return tensor_from_bytes, (flat.view(torch.uint8).numpy().tobytes(), t.dtype, tuple(t.shape))


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
