"""Video probing, frame sampling and decoding for the shard writer (data-contract §6, §12, §13).

One call, :func:`process_video`, turns a local media file into N JPEG frames (plus optional mp4 bytes).

Design, and why:

* **Times, not indices, define samples** (VFR is common). :func:`sample_times` draws times in
  ``[clip_start, clip_end)``; each time maps to the frame *displayed* at that time (the last frame whose
  pts is ``<=`` it), so every backend picks the same frame.
* **Untrusted media runs in a killable child.** In-process decoding cannot be interrupted, so every
  probe/decode runs in a small pool of pre-started worker processes (``python -c`` children, own
  session). The caller waits at most ``timeout_s``; a worker past its deadline is killed with its
  whole process group (ffmpeg children included) and replaced, and the sample fails as ``timeout``.
  A decoder crash (segfault) ends the same way as ``decode_error`` instead of taking the Ray worker
  down. The pool costs one interpreter start per calling process and a few ms of IPC per video
  (frames travel only as JPEG bytes); ``bench/bench_frames.py`` measures it.
* **Protocols and demuxers are whitelisted** in both backends (``file,pipe`` and the common
  containers), paths are passed as ``file:`` URLs and must be regular files, so an HLS/concat playlist
  disguised as ``.mp4`` fails as ``decode_error`` without reading other files or the network.
* **Two backends, one plan.** A demux-only pass over the clip span lists every packet's pts and
  keyframe flag, so each sampled time maps to the exact pts of the frame shown then. ``pyav`` decodes
  in process and, per video, groups the sampled times into runs: inside a run it decodes sequentially,
  between runs it seeks to the keyframe, whichever costs fewer decoded frames (long GOPs -> one
  sequential pass; short GOPs and sparse frames -> seek per frame). On its way to a planned frame it
  skips frames nothing references (H.264/MPEG B-frames, ``skip_frame=NONREF`` per packet), which
  leaves every other frame bit-exact and saves 30-45 % of the decoding on x264 clips.
  ``ffmpeg`` starts ONE ffmpeg-python process per video with input seeking to the clip start and a
  ``select`` filter on the exact chosen timestamps, raw RGB on a pipe.
* **Default backend: ``pyav``**, chosen by ``bench/bench_frames.py`` (it avoids the ffmpeg start-up
  and the full decode of every frame in the span that a ``select`` filter implies).
* **One swscale pass per frame.** A chosen frame goes from YUV straight to RGB at the size
  :func:`pipelines.resize.resize` would scale it to (bicubic, chroma interpolated at full resolution),
  then ``resize`` only crops or pads, and the worker JPEG-encodes it. Both backends use the same flags,
  orientation order and chroma siting, so they give the same pixels.

Output is byte-deterministic for the same file, options, key and library versions.
"""
# This package splits that work by concept: ``sampling`` (times -> frames, pure), ``probe`` (PyAV demux:
# stream facts, packet scan, seeking), ``pyav_backend`` and ``ffmpeg_backend`` (the two decoders; the latter
# also re-encodes mp4), ``extract`` (one video's job inside the worker) and ``sandbox`` (the killable worker
# pool). This module is the public facade: the pipeline, inference, tests and benches import from here.

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import asdict

from pipelines.errors import DECODE_ERROR, INVALID_INPUT, SampleError
from pipelines.video.ffmpeg_backend import ffmpeg_binary, run_ffmpeg
from pipelines.video.options import (BACKENDS, FORMAT_WHITELIST, MAX_FRAMES, MAX_PIXELS, PROTOCOL_WHITELIST,
                                     SAMPLERS, VideoOptions, VideoSample)
from pipelines.video.sampling import pick_frames, sample_times, stable_seed
from pipelines.video.sandbox import POOL

__all__ = ["BACKENDS", "FORMAT_WHITELIST", "MAX_FRAMES", "MAX_PIXELS", "PROTOCOL_WHITELIST", "SAMPLERS",
           "VideoOptions", "VideoSample", "ffmpeg_binary", "pick_frames", "probe_video", "process_video",
           "run_ffmpeg", "sample_times", "stable_seed"]

log = logging.getLogger(__name__)

_STALL_ENV = "MPLUG2_VIDEO_TEST_STALL_S"  # test hook: the worker sleeps this long before decoding


def process_video(path: str, *, key: str, opts: VideoOptions,
                  clip_start: float | None = None, clip_end: float | None = None) -> VideoSample:
    """Sample, resize and JPEG-encode frames of a LOCAL video file under ``opts.timeout_s``.

    Raises :class:`~pipelines.errors.SampleError` with reason ``decode_error`` | ``timeout`` |
    ``too_small`` | ``clip_out_of_range`` (and ``invalid_input`` for ``clip_start >= clip_end``).
    Deterministic: same file + opts + key -> byte-identical frames.
    """
    _check_local_file(path)
    if clip_start is not None and clip_end is not None and clip_start >= clip_end:
        raise SampleError(INVALID_INPUT, f"clip start {clip_start} >= end {clip_end}")
    stall = float(os.environ.get(_STALL_ENV, "0") or 0)
    req = ("process", str(path), key, asdict(opts), clip_start, clip_end, stall)
    t0 = time.monotonic()
    frames, meta, mp4 = POOL.call(req, opts.timeout_s, what=f"video {key!r}")
    log.debug("video %s: %d frames via %s in %.3fs", key, len(frames), opts.backend, time.monotonic() - t0)
    return VideoSample(frames=frames, meta=meta, mp4=mp4)


def probe_video(path: str, timeout_s: float = 30.0) -> dict:
    """duration (s), fps (average rate), num_frames, width, height (coded), rotation (deg), codec."""
    _check_local_file(path)
    return POOL.call(("probe", str(path)), timeout_s, what=f"probe {path!r}")


def _check_local_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SampleError(DECODE_ERROR, f"cannot stat {path!r}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SampleError(DECODE_ERROR, f"{path!r} is not a regular file")
    if st.st_size == 0:
        raise SampleError(DECODE_ERROR, f"{path!r} is empty")

