"""How a batch crosses from a DataLoader worker to the trainer process.

torch hands a worker's batch over with ``ForkingPickler``: every CPU tensor's storage goes into a shared-memory
segment of its own, and its file descriptor crosses through multiprocessing's resource sharer (a socket
connection, ``sendmsg`` and ``mmap`` per tensor, in both processes). That suits the pixels, which are megabytes
and already written into shared memory by the worker (:func:`mplug2.data.augment.batch_tensor`). It does not
suit the batch's other tensors: token ids, attention masks, sample ids, the drawn augmentation ops. Those are a
few hundred bytes each, four or five per batch, and travel inside the pickle instead (:func:`small_by_value`).
"""

from __future__ import annotations

from typing import Any

import torch

from mplug2.tensor_bytes import tensor_reduction

__all__ = ["BY_VALUE_MAX_BYTES", "small_by_value"]

# at most this many bytes a tensor is copied into the pickle; above, it goes through shared memory
BY_VALUE_MAX_BYTES = 64 << 10


class _ByValue:
    """A tensor that pickles as its bytes and unpickles as a plain tensor (the trainer never sees this)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple:
        return tensor_reduction(self.tensor)


def small_by_value(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its small CPU tensors marked to cross to the trainer inside the pickle. Only for what a
    worker returns: in the trainer process the marks would stay (nothing pickles the batch there)."""
    return {k: _ByValue(v) if isinstance(v, torch.Tensor) and v.device.type == "cpu"
            and v.numel() * v.element_size() <= BY_VALUE_MAX_BYTES else v for k, v in batch.items()}
