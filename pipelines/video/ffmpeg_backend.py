"""The ffmpeg binary: one process per video that seeks to the clip and ``select``s the exact frames (raw RGB on
a pipe, same swscale flags and chroma siting as the PyAV path), the deterministic mp4 re-encode, and
:func:`run_ffmpeg`, which runs a command under a hard deadline."""

from __future__ import annotations

import functools
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.errors import DECODE_ERROR, TIMEOUT, SampleError
from pipelines.video.options import FORMAT_WHITELIST, PROTOCOL_WHITELIST, VideoOptions
from pipelines.video.probe import DECODE_THREADS, StreamInfo, coded_target_size
from pipelines.video.sampling import pick_frames

log = logging.getLogger(__name__)

# Frames are converted and scaled in one swscale pass (both backends): bicubic (PIL's default filter in
# pipelines.resize), chroma interpolated at full resolution instead of replicated.
SWS_FLAGS = "bicubic+full_chroma_int+accurate_rnd"
# Decoders that tag 4:2:0 chroma as sited "left" (MPEG-2 style) unless the stream says otherwise.
_CHROMA_LEFT_CODECS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4", "h263", "vvc"})


@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    """``$FFMPEG_BINARY``, then ``ffmpeg`` on PATH, then imageio-ffmpeg's static build (environment §2)."""
    env = os.environ.get("FFMPEG_BINARY")
    if env:
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def decode_ffmpeg(path: str, info: StreamInfo, pts: list[float], times: list[float], opts: VideoOptions,
                   deadline: float) -> list[tuple[float, Any]]:
    """ONE ffmpeg process: seek to the clip start, ``select`` the exact frames, raw RGB on a pipe."""
    import ffmpeg
    from PIL import Image

    idx = pick_frames(pts, times)
    wanted = sorted(set(idx))
    wanted_t = [pts[i] for i in wanted]
    gaps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    eps = min(5e-4, min(gaps) / 2) if gaps else 5e-4
    # -copyts keeps the file's timestamps, so `t` in the filter is the absolute pts in seconds.
    expr = "+".join(f"lt(abs(t-{t + info.start:.6f}),{eps:.6f})" for t in wanted_t)
    seek = max(0.0, wanted_t[0] - 1e-3)
    span = wanted_t[-1] - seek + max(eps, 1e-3) * 4
    # Same pixels as the PyAV path: no autorotate; scale in the coded orientation with the same swscale
    # flags, then rotate in PIL. PyAV's swscale honours the frame's chroma siting tag; this ffmpeg's
    # scale filter takes "center" unless told, so name the siting the MPEG-family decoders tag.
    rot = info.rotation
    w, h = coded_target_size(info.width, info.height, rot, opts.size, opts.resize_mode)
    stream = ffmpeg.input("file:" + os.path.abspath(path), ss=f"{seek + info.start:.6f}", t=f"{span:.6f}",
                          protocol_whitelist=PROTOCOL_WHITELIST, format_whitelist=FORMAT_WHITELIST,
                          threads=DECODE_THREADS, copyts=None, noautorotate=None)
    out = (stream.video.filter("select", expr)
           .filter("scale", w, h, flags=SWS_FLAGS,
                   **({"in_chroma_loc": "left"} if info.codec in _CHROMA_LEFT_CODECS else {}))
           .output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")
           .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-filter_threads", "1"))
    argv = ffmpeg.compile(out, cmd=ffmpeg_binary())
    frame_bytes = w * h * 3
    raw, rc, err = run_ffmpeg(argv, deadline - time.monotonic(), expect_bytes=frame_bytes * len(wanted))
    n = len(raw) // frame_bytes
    if n == 0:
        raise SampleError(DECODE_ERROR, f"ffmpeg produced no frames (exit {rc}): {err[-300:]}")
    if rc != 0 or n < len(wanted):
        log.warning("ffmpeg gave %d/%d frames (exit %d): %s", n, len(wanted), rc, err[-300:])
    images = {}
    for j, i in enumerate(wanted):
        k = min(j, n - 1)  # missing tail frames repeat the last decoded one
        img = Image.frombuffer("RGB", (w, h), raw[k * frame_bytes:(k + 1) * frame_bytes], "raw", "RGB", 0, 1)
        images[i] = (wanted_t[k], img.rotate(rot, expand=True) if rot else img)
    return [images[i] for i in idx]


def run_ffmpeg(argv: list[str], timeout_s: float, expect_bytes: int | None = None) -> tuple[bytes, int, str]:
    """Run ffmpeg with stdout on a pipe, stderr to a temp file, and a hard deadline.

    Returns (stdout bytes, exit code, stderr text). At the deadline the whole process group is killed
    and ``SampleError("timeout")`` raised. ``expect_bytes`` pre-sizes the read buffer.
    """
    if timeout_s <= 0:
        raise SampleError(TIMEOUT, "no time left before ffmpeg could start")
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                                start_new_session=True)
        chunks: list[bytes] = []
        try:
            fd = proc.stdout.fileno()
            os.set_blocking(fd, False)
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    if not sel.select(left):
                        continue
                    try:
                        chunk = os.read(fd, 1 << 20)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    chunks.append(chunk)
            left = deadline - time.monotonic()
            proc.wait(timeout=max(left, 0.001))
        except (TimeoutError, subprocess.TimeoutExpired):
            _kill_group(proc)
            raise SampleError(TIMEOUT, f"ffmpeg exceeded {timeout_s:.1f}s") from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            proc.stdout.close()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
    return b"".join(chunks), proc.returncode, err


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ffmpeg's process group, unless ffmpeg was reaped already (its pid may belong to another process
    by now)."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def reencode(path: str, info: StreamInfo, start: float, end: float, opts: VideoOptions, deadline: float) -> bytes:
    """The clip span as deterministic H.264 mp4 (short side scaled down to ``opts.size``, no audio)."""
    import ffmpeg

    s = opts.size
    with tempfile.TemporaryDirectory(prefix="mplug2-mp4-") as tmp:
        dst = os.path.join(tmp, "clip.mp4")
        stream = ffmpeg.input("file:" + os.path.abspath(path), ss=f"{start:.6f}", t=f"{end - start:.6f}",
                              protocol_whitelist=PROTOCOL_WHITELIST, format_whitelist=FORMAT_WHITELIST)
        scale = f"min(1,{s}/min(iw,ih))"
        v = stream.video.filter("scale", f"trunc(iw*{scale}/2)*2", f"trunc(ih*{scale}/2)*2")
        out = (v.output(dst, vcodec="libx264", preset="veryfast", crf=23, pix_fmt="yuv420p", threads=2,
                        an=None, sn=None, dn=None, map_metadata=-1, map_chapters=-1, fflags="+bitexact",
                        **{"flags:v": "+bitexact", "movflags": "+faststart"})
               .global_args("-nostdin", "-hide_banner", "-loglevel", "error"))
        argv = ffmpeg.compile(out, cmd=ffmpeg_binary())
        _, rc, err = run_ffmpeg(argv, deadline - time.monotonic())
        if rc != 0 or not os.path.exists(dst):
            raise SampleError(DECODE_ERROR, f"re-encode failed (exit {rc}): {err[-300:]}")
        return Path(dst).read_bytes()
