"""Sample times inside a clip and the frame shown at each time: pure functions, the same for every backend
(data-contract §12). Times, not indices, define samples, so variable frame rates pick the right frames."""

from __future__ import annotations

import bisect
import hashlib
import math
import random

from pipelines.video.options import SAMPLERS

def stable_seed(seed: int, key: str) -> int:
    """A 64-bit seed from (dataset seed, sample key) that is the same in every process and run."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sample_times(sampler: str, clip_start: float, clip_end: float, *, num_frames: int = 8, fps: float = 1.0,
                 max_frames: int = 64, seed: int = 0, key: str = "") -> list[float]:
    """Sorted sample times (seconds) inside ``[clip_start, clip_end)`` (data-contract §12)."""
    span = clip_end - clip_start
    if span <= 0:
        raise ValueError(f"empty clip [{clip_start}, {clip_end})")
    if sampler == "middle":
        seg = span / num_frames
        return [clip_start + (i + 0.5) * seg for i in range(num_frames)]
    if sampler == "random_segment":
        rng = random.Random(stable_seed(seed, key))
        seg = span / num_frames
        # u in [0, 1): the time stays inside its segment and strictly below clip_end.
        return [min(clip_start + (i + rng.random()) * seg, math.nextafter(clip_end, clip_start))
                for i in range(num_frames)]
    if sampler == "fps":
        count = min(max_frames, max(1, math.ceil(span * fps - 1e-9)))
        return [clip_start + i / fps for i in range(count)]
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def pick_frames(frame_pts: list[float], times: list[float]) -> list[int]:
    """For each time, the index of the frame displayed then: last pts <= t (the first frame if none)."""
    out = []
    for t in times:
        i = bisect.bisect_right(frame_pts, t + 1e-6) - 1
        out.append(max(i, 0))
    return out

