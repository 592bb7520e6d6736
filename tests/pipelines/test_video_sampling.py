"""Frame samplers and options (data-contract §12): pure functions, no media needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pathlib import Path

from pipelines.errors import ConfigError
from pipelines.video import VideoOptions, pick_frames, sample_times, stable_seed

ROOT = str(Path(__file__).resolve().parents[2])


def test_middle_takes_segment_middles():
    times = sample_times("middle", 2.0, 6.0, num_frames=4)
    assert times == pytest.approx([2.5, 3.5, 4.5, 5.5])


@pytest.mark.parametrize("key", ["a", "video/0001", "ü-ñ"])
def test_random_segment_one_time_inside_each_segment(key):
    n, lo, hi = 8, 1.0, 9.0
    times = sample_times("random_segment", lo, hi, num_frames=n, seed=3, key=key)
    seg = (hi - lo) / n
    assert times == sorted(times)
    for i, t in enumerate(times):
        assert lo + i * seg <= t < lo + (i + 1) * seg


def test_random_segment_deterministic_per_key_and_seed():
    a = sample_times("random_segment", 0, 10, num_frames=8, seed=0, key="k1")
    assert a == sample_times("random_segment", 0, 10, num_frames=8, seed=0, key="k1")
    assert a != sample_times("random_segment", 0, 10, num_frames=8, seed=0, key="k2")
    assert a != sample_times("random_segment", 0, 10, num_frames=8, seed=1, key="k1")


def test_stable_seed_does_not_depend_on_python_hash_randomisation():
    code = "from pipelines.video import stable_seed; print(stable_seed(7, 'clip-42'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}, cwd=ROOT).stdout.strip()
            for h in (1, 2)}
    assert outs == {str(stable_seed(7, "clip-42"))}


def test_fps_spacing_and_cap():
    times = sample_times("fps", 1.0, 4.5, fps=2.0, max_frames=64)
    assert times == pytest.approx([1.0 + i / 2 for i in range(7)])  # 1.0 .. 4.0, all < 4.5
    assert all(t < 4.5 for t in times)
    capped = sample_times("fps", 0.0, 100.0, fps=1.0, max_frames=5)
    assert capped == pytest.approx([0, 1, 2, 3, 4])


def test_fps_short_clip_gives_one_frame():
    assert sample_times("fps", 0.0, 0.3, fps=1.0) == [0.0]


def test_pick_frames_uses_the_frame_displayed_at_each_time():
    pts = [0.0, 0.04, 0.12, 0.2]  # VFR: a long gap after 0.04
    assert pick_frames(pts, [0.0, 0.03, 0.04, 0.1, 0.5]) == [0, 0, 1, 1, 3]
    assert pick_frames([0.1, 0.2], [0.05]) == [0]  # before the first frame: the first frame


@pytest.mark.parametrize("bad", [dict(sampler="uniform"), dict(backend="decord"), dict(num_frames=0),
                                 dict(num_frames=1001), dict(max_frames=2000), dict(fps=0.0),
                                 dict(resize_mode="stretch"), dict(timeout_s=0), dict(jpeg_quality=0)])
def test_bad_options_fail_at_start_up(bad):
    with pytest.raises(ConfigError):
        VideoOptions(**bad)
