"""Many user items -> pixel batches: load items concurrently (each through :class:`MediaLoader`), keep failures as
per-item errors, and batch the rest by frame count (images have one frame, videos ``num_frames``), in input order
within each group."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mplug2.inference.media import Media, MediaError, MediaLoader, MediaOptions
from mplug2.inference.predictor import Predictor

__all__ = ["Batch", "pixel_batches"]


@dataclass
class Batch:
    items: list[Media]
    positions: list[int]           # each item's index in the input
    pixels: torch.Tensor           # (B, T, 3, H, W)


def pixel_batches(predictor: Predictor, sources: Sequence[str], *, batch_size: int = 8, workers: int = 4,
                  options: MediaOptions | None = None, errors: list[tuple[int, MediaError]] | None = None,
                  progress: bool = False) -> Iterator[Batch]:
    """Yield batches of loaded items; failed items are appended to ``errors`` as ``(position, MediaError)``.
    Loading overlaps (``workers`` threads; videos decode in the sandbox's worker processes)."""
    from tqdm import tqdm

    opts = options or MediaOptions(num_frames=predictor.num_frames)
    pending: dict[int, list[tuple[int, Media, torch.Tensor]]] = {}
    with MediaLoader(opts) as loader, ThreadPoolExecutor(max(1, workers), thread_name_prefix="media") as pool:
        futures = [pool.submit(loader.load, s) for s in sources]
        for pos, fut in enumerate(tqdm(futures, desc="items", unit="item", disable=not progress)):
            try:
                media = fut.result()
            except Exception as exc:  # noqa: BLE001  (one item's failure never stops the others)
                err = exc if isinstance(exc, MediaError) else MediaError(
                    sources[pos], "internal_error", f"{type(exc).__name__}: {exc}")
                if errors is not None:
                    errors.append((pos, err))
                continue
            pixels = predictor.pixels_from_frames(media.frames)
            group = pending.setdefault(pixels.shape[0], [])
            group.append((pos, media, pixels))
            if len(group) >= batch_size:
                yield _batch(pending.pop(pixels.shape[0]))
    for group in pending.values():
        yield _batch(group)


def _batch(group: list[tuple[int, Media, torch.Tensor]]) -> Batch:
    return Batch([m for _, m, _ in group], [p for p, _, _ in group], torch.stack([x for _, _, x in group]))
