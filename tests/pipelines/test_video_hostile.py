"""Hostile and broken inputs end as a reason code, fast, without side effects (data-contract §11, §13)."""

from __future__ import annotations

import os
import time

import av
import pytest

from pipelines.errors import SampleError
from pipelines.video import VideoOptions, ffmpeg_binary, probe_video, process_video, run_ffmpeg
from tests.media import make_audio, make_index_video, make_png, make_video, truncate_copy

BACKENDS = ("pyav", "ffmpeg")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    good = make_index_video(d / "good.mp4", frames=60, fps=25, gop=10, size=(160, 120))
    fast = make_index_video(d / "fast.mp4", frames=60, fps=25, gop=10, size=(160, 120), faststart=True)
    segment = make_video(d / "seg.ts", seconds=1, fps=25, size=(64, 48))
    files = {
        "zero": d / "zero.mp4",
        "text": d / "text.mp4",
        "png": d / "png.mp4",
        "audio_only": make_audio(d / "audio.m4a"),
        "truncated_30": truncate_copy(good, d / "trunc.mp4", 0.3),  # moov at the end: lost
        "hls_local_file": d / "hls_passwd.mp4",
        "hls_network": d / "hls_http.mp4",
        "hls_real_segment": d / "playlist.m3u8",  # newer libavformat only probes HLS by extension
        "concat": d / "concat.mp4",
    }
    files["zero"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 50)
    make_png(d / "img.png").rename(files["png"])
    files["hls_local_file"].write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nfile:///etc/passwd\n"
                                       "#EXT-X-ENDLIST\n")
    files["hls_network"].write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n"
                                    "http://127.0.0.1:9/segment.ts\n#EXT-X-ENDLIST\n")
    files["hls_real_segment"].write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{segment}\n"
                                         "#EXT-X-ENDLIST\n")
    files["concat"].write_text(f"ffconcat version 1.0\nfile '{good}'\n")
    return d, good, fast, files


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["zero", "text", "png", "audio_only", "truncated_30", "hls_local_file",
                                  "hls_network", "hls_real_segment", "concat"])
def test_bad_inputs_are_decode_errors(media, backend, name):
    path = media[3][name]
    t0 = time.monotonic()
    with pytest.raises(SampleError) as e:
        process_video(str(path), key=name, opts=VideoOptions(backend=backend, timeout_s=10))
    assert e.value.reason == "decode_error", e.value
    assert time.monotonic() - t0 < 5


def test_playlist_trick_is_real_without_the_whitelist(media):
    """Guard for the test above: unrestricted libavformat follows a playlist into other files."""
    path = media[3]["hls_real_segment"]
    with av.open(str(path)) as c:
        assert c.format.name == "hls"
        assert c.streams.video  # it read another file named inside the "mp4"
    with pytest.raises(SampleError) as e:
        probe_video(str(path))
    assert e.value.reason == "decode_error"


def test_non_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    for p in (fifo, tmp_path, tmp_path / "missing.mp4"):
        with pytest.raises(SampleError) as e:
            process_video(str(p), key="k", opts=VideoOptions(timeout_s=2))
        assert e.value.reason == "decode_error"


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_download_keeps_what_decodes_and_pads(media, backend):
    """A faststart mp4 cut at 50 %: the index survives, the tail is missing -> last frame repeats."""
    d, _, fast, _ = media
    cut = truncate_copy(fast, d / f"cut_{backend}.mp4", 0.5)
    s = process_video(str(cut), key="k", opts=VideoOptions(backend=backend, num_frames=8, size=32))
    assert len(s.frames) == 8 and s.meta["padded"] is True
    assert s.frames[-1] == s.frames[-2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stalled_decode_ends_as_timeout_and_pool_recovers(media, backend, monkeypatch):
    good = media[1]
    monkeypatch.setenv("MPLUG2_VIDEO_TEST_STALL_S", "60")
    t0 = time.monotonic()
    with pytest.raises(SampleError) as e:
        process_video(str(good), key="k", opts=VideoOptions(backend=backend, timeout_s=1.0))
    took = time.monotonic() - t0
    assert e.value.reason == "timeout"
    assert 1.0 <= took < 2.0
    monkeypatch.delenv("MPLUG2_VIDEO_TEST_STALL_S")
    s = process_video(str(good), key="k", opts=VideoOptions(backend=backend, timeout_s=10, size=32))
    assert len(s.frames) == 8


def test_ffmpeg_subprocess_deadline_kills_the_process_group(tmp_path):
    """ffmpeg blocked on an input that never delivers (a FIFO with no writer) is killed at the deadline."""
    fifo = tmp_path / "stall.mp4"
    os.mkfifo(fifo)
    argv = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-i", str(fifo), "-f", "rawvideo", "pipe:"]
    t0 = time.monotonic()
    with pytest.raises(SampleError) as e:
        run_ffmpeg(argv, timeout_s=1.0)
    assert e.value.reason == "timeout"
    assert time.monotonic() - t0 < 2.0
    # No ffmpeg is left reading that FIFO.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        assert str(fifo).encode() not in cmdline


def test_ffmpeg_exit_code_and_stderr_are_reported(tmp_path):
    argv = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "nope.mp4"), "-f", "null", "-"]
    out, rc, err = run_ffmpeg(argv, timeout_s=10)
    assert rc != 0 and "nope.mp4" in err and out == b""


def test_closing_an_exited_decoder_worker_signals_no_reusable_pid(monkeypatch):
    """A decoder worker that exits on its own (end of its request pipe) is reaped, and its pid, the id of its
    process group, is then free for the kernel to reuse: closing it must not ``killpg`` that pid, which would
    kill whatever process got it (on a busy machine with ``pid_max`` 32768 that happens)."""
    from pipelines.video import sandbox

    worker = sandbox._Worker()
    signalled: list[int] = []
    real_killpg = os.killpg
    monkeypatch.setattr(sandbox.os, "killpg", lambda pgid, sig: (signalled.append(pgid), real_killpg(pgid, sig)))
    worker.close()
    assert worker.proc.returncode == 0, "the worker ends cleanly at end of file on its request pipe"
    assert signalled == []
    # A worker still running when killed loses its whole group, as before.
    stuck = sandbox._Worker()
    stuck.kill()
    assert signalled == [stuck.proc.pid] and stuck.proc.returncode == -9
