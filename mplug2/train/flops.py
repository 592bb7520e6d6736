"""Model FLOPs utilisation (MFU) of every training step: FLOPs measured, peak looked up.

FLOPs per sample are counted once per batch shape (frames x resolution x batch size: an image corpus and a video
corpus of one mixture differ ~8x) with ``torch.utils.flop_counter.FlopCounterMode`` around the real forward +
backward of the first micro-batch of that shape, so they follow the model, the objectives and the task as they
are, with no hand-written formula to keep in sync. A step's FLOPs are the sum over its micro-batches; achieved
TFLOP/s per device = step FLOPs / step time, MFU = achieved / the device's dense bf16 peak.

Under activation checkpointing the counted FLOPs include the recomputed forward: the figure is then HFU
(hardware FLOPs utilisation), higher than the MFU of the same run without it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops", "StepFlops"]

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s. Matched against
# ``torch.cuda.get_device_name`` (upper case, "-" as space), longest key first: "H100 PCIE" before "H100".
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIE": 756.0,
    "H100": 989.0,            # SXM (the name reads e.g. "NVIDIA H100 80GB HBM3")
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,             # AWS's figure for its A10 variant
    "A10": 125.0,
    "RTX 4090": 165.0,
}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override`` (``scale.peak_tflops``) when given, else the
    table's entry for this CUDA device; None (no MFU) for CPUs and unknown devices."""
    if override:
        return float(override)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper().replace("-", " ")
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _shape(batch: dict[str, Any]) -> tuple[int, ...] | None:
    pixels = batch.get("pixels")
    if not isinstance(pixels, torch.Tensor):
        return None
    return tuple(pixels.shape)


class StepFlops:
    """FLOPs per micro-batch shape, measured on the first micro-batch of each shape (:meth:`measure`)."""

    def __init__(self) -> None:
        self.per_shape: dict[tuple[int, ...], float] = {}

    @contextlib.contextmanager
    def measure(self, batch: dict[str, Any]) -> Iterator[None]:
        """Wrap one micro-batch's forward *and* backward; counts only for a shape not seen before."""
        key = _shape(batch)
        if key is None or key in self.per_shape:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.per_shape[key] = float(counter.get_total_flops())
        log.info("FLOPs of a micro-batch of shape %s (forward + backward): %.3g (%.3g per sample)", key,
                 self.per_shape[key], self.per_shape[key] / max(1, key[0]))

    def of(self, batch: dict[str, Any]) -> float:
        """FLOPs of one micro-batch of ``batch``'s shape (0 if never measured)."""
        key = _shape(batch)
        return self.per_shape.get(key, 0.0) if key is not None else 0.0
