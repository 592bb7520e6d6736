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

from __future__ import annotations

import atexit
import bisect
import functools
import hashlib
import logging
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipelines.errors import (
    CLIP_OUT_OF_RANGE,
    DECODE_ERROR,
    INTERNAL_ERROR,
    INVALID_INPUT,
    TIMEOUT,
    TOO_SMALL,
    ConfigError,
    SampleError,
)
from pipelines.resize import RESIZE_MODES, encode_jpeg, resize, scaled_size

log = logging.getLogger(__name__)

SAMPLERS = ("middle", "random_segment", "fps")
BACKENDS = ("pyav", "ffmpeg")
MAX_FRAMES = 1000  # three-digit field names f000..f999
PROTOCOL_WHITELIST = "file,pipe"
# Demuxer short names of this ffmpeg (`ffmpeg -demuxers`); "mov" matches "mov,mp4,m4a,3gp,3g2,mj2".
FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpegts,flv"
MAX_PIXELS = 7680 * 4320  # 8K: larger frames are refused (decompression-bomb guard)
DECODE_THREADS = 2
DECODE_THREAD_TYPE = "AUTO"  # frame + slice threading
# Seeking costs a decoder flush plus refilling the threading pipeline; expressed in decoded frames.
SEEK_COST_FRAMES = 6
# Frames are converted and scaled in one swscale pass (both backends): bicubic (PIL's default filter in
# pipelines.resize), chroma interpolated at full resolution instead of replicated.
SWS_FLAGS = "bicubic+full_chroma_int+accurate_rnd"
# Decoders that tag 4:2:0 chroma as sited "left" (MPEG-2 style) unless the stream says otherwise.
_CHROMA_LEFT_CODECS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4", "h263", "vvc"})
# Codecs whose "non-reference" frames are never referenced (H.264 nal_ref_idc 0, MPEG-1/2/4 B-frames), so
# ``skip_frame=NONREF`` leaves every other frame bit-exact. Not HEVC: its sub-layer non-reference pictures
# may still be referenced by higher temporal sub-layers.
_NONREF_SAFE_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4"})
# Scale + JPEG-encode chosen frames on a helper thread while the decoder continues (see _FrameScaler).
OVERLAP_ENCODE = True
# Below this frame size, or this many packets per planned run, the decoder runs single-threaded
# (see _decode_threads).
THREADED_MIN_PIXELS = 640 * 480
THREADED_MIN_FRAMES_PER_RUN = 4
# Sample times in meta are rounded to ms; frames are matched with a tolerance below any sane interval.
_STALL_ENV = "MPLUG2_VIDEO_TEST_STALL_S"  # test hook: the worker sleeps this long before decoding


@dataclass(frozen=True)
class VideoOptions:
    """How to sample and encode frames of one video (the shard runner's ``--video-*`` options)."""

    num_frames: int = 8
    sampler: str = "middle"          # "middle" (eval) | "random_segment" (train) | "fps"
    fps: float = 1.0                 # for sampler="fps"
    max_frames: int = 64             # cap for sampler="fps" (and <= 1000 overall)
    size: int = 224                  # output side in pixels
    resize_mode: str = "center_crop" # pipelines.resize.RESIZE_MODES
    jpeg_quality: int = 95
    backend: str = "pyav"            # "pyav" | "ffmpeg"  (default chosen by measurement)
    timeout_s: float = 60.0          # deadline for one video's decode; past it -> SampleError("timeout")
    min_duration: float = 0.0        # shorter clip -> SampleError("too_small")
    keep_video: bool = False         # also return the re-encoded clip span as mp4 bytes
    seed: int = 0                    # dataset seed; random_segment draws from (seed, key)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not 1 <= self.num_frames <= MAX_FRAMES:
            raise ConfigError(f"num_frames must be in [1, {MAX_FRAMES}], got {self.num_frames}")
        if not 1 <= self.max_frames <= MAX_FRAMES:
            raise ConfigError(f"max_frames must be in [1, {MAX_FRAMES}], got {self.max_frames}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"fps must be a positive number, got {self.fps}")
        if self.size < 1:
            raise ConfigError(f"size must be positive, got {self.size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.min_duration < 0:
            raise ConfigError(f"min_duration must be >= 0, got {self.min_duration}")


@dataclass
class VideoSample:
    """Sampled frames (JPEG bytes, temporal order), their metadata (merged into the sample json), mp4."""

    frames: list[bytes]
    meta: dict
    mp4: bytes | None


# --------------------------------------------------------------------------------------------------
# ffmpeg binary and sampling (pure functions)


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


# --------------------------------------------------------------------------------------------------
# Public API


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
    frames, meta, mp4 = _POOL.call(req, opts.timeout_s, what=f"video {key!r}")
    log.debug("video %s: %d frames via %s in %.3fs", key, len(frames), opts.backend, time.monotonic() - t0)
    return VideoSample(frames=frames, meta=meta, mp4=mp4)


def probe_video(path: str, timeout_s: float = 30.0) -> dict:
    """duration (s), fps (average rate), num_frames, width, height (coded), rotation (deg), codec."""
    _check_local_file(path)
    return _POOL.call(("probe", str(path)), timeout_s, what=f"probe {path!r}")


def _check_local_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SampleError(DECODE_ERROR, f"cannot stat {path!r}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SampleError(DECODE_ERROR, f"{path!r} is not a regular file")
    if st.st_size == 0:
        raise SampleError(DECODE_ERROR, f"{path!r} is empty")


# --------------------------------------------------------------------------------------------------
# Worker pool: decoding under an enforceable deadline


class _Worker:
    """One pre-started decoder process speaking pickled messages over two pipes."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from pipelines.video import _worker_main; "
                "_worker_main(int(sys.argv[2]), int(sys.argv[3]))")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", code, root, str(req_r), str(resp_w)],
                                     pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL,
                                     stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,
                                     start_new_session=True, env=env, close_fds=True)
        os.close(req_r)
        os.close(resp_w)
        self.send_conn = Connection(req_w, readable=False)
        self.recv_conn = Connection(resp_r, writable=False)

    def call(self, req: tuple, timeout_s: float) -> tuple:
        self.send_conn.send(req)
        if not self.recv_conn.poll(timeout_s):
            raise TimeoutError
        return self.recv_conn.recv()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and any ffmpeg it started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.send_conn.close()
        self.recv_conn.close()

    def close(self) -> None:
        try:
            self.send_conn.close()  # EOF: the worker exits its loop
            self.proc.wait(timeout=2)
        except (subprocess.TimeoutExpired, OSError):
            pass
        self.kill()


def _has_fileno(f: Any) -> bool:
    try:
        f.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


class _WorkerPool:
    """Idle workers reused across calls; a worker that timed out or died is discarded, never reused."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self.started = 0

    def call(self, req: tuple, timeout_s: float, what: str) -> Any:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker()
            self.started += 1
        try:
            reply = worker.call(req, timeout_s)
        except TimeoutError:
            worker.kill()
            log.warning("%s: decode past its %.1fs deadline, worker killed", what, timeout_s)
            raise SampleError(TIMEOUT, f"decode exceeded {timeout_s:.1f}s") from None
        except (EOFError, OSError) as e:
            worker.kill()
            rc = worker.proc.returncode
            log.warning("%s: decoder process died (exit %s)", what, rc)
            raise SampleError(DECODE_ERROR, f"decoder process died (exit {rc}): {type(e).__name__}") from None
        except BaseException:
            worker.kill()
            raise
        with self._lock:
            self._idle.append(worker)
        if reply[0] == "ok":
            return reply[1]
        _, reason, message = reply
        raise SampleError(reason, message)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()


_POOL = _WorkerPool()
atexit.register(_POOL.close)


def _worker_main(req_fd: int, resp_fd: int) -> None:
    """Worker loop: one request at a time until the parent closes the pipe."""
    recv = Connection(req_fd, writable=False)
    send = Connection(resp_fd, readable=False)
    os.dup2(2, 1)  # stray prints must not corrupt anything
    while True:
        try:
            req = recv.recv()
        except (EOFError, OSError):
            return
        send.send(_handle(req))


def _handle(req: tuple) -> tuple:
    import av

    try:
        if req[0] == "probe":
            return ("ok", _probe_file(req[1]))
        _, path, key, opts_d, clip_start, clip_end, stall = req
        if stall:
            time.sleep(stall)
        return ("ok", _process_in_worker(path, key, VideoOptions(**opts_d), clip_start, clip_end))
    except SampleError as e:
        return ("err", e.reason, e.message)
    except (av.FFmpegError, UnicodeDecodeError, EOFError) as e:
        return ("err", DECODE_ERROR, f"{type(e).__name__}: {e}")
    except Exception as e:  # a bug: type and message recorded (data-contract §11)
        log.exception("internal error decoding %s", req[1])
        return ("err", INTERNAL_ERROR, f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------------
# Inside the worker: probing, planning, decoding


@dataclass
class _Info:
    duration: float
    fps: float
    num_frames: int
    width: int
    height: int
    rotation: int
    codec: str
    start: float  # stream start time (s); all times below are relative to it

    def public(self) -> dict:
        return {"duration": round(self.duration, 3), "fps": round(self.fps, 3), "num_frames": self.num_frames,
                "width": self.width, "height": self.height, "rotation": self.rotation, "codec": self.codec}


def _open(path: str):
    import av

    try:
        return av.open("file:" + os.path.abspath(path), mode="r", metadata_errors="ignore",
                       container_options={"protocol_whitelist": PROTOCOL_WHITELIST,
                                          "format_whitelist": FORMAT_WHITELIST})
    except av.FFmpegError as e:
        raise SampleError(DECODE_ERROR, f"cannot open as video: {e}") from None


def _video_stream(container):
    import av

    for s in container.streams.video:
        if not s.disposition & av.stream.Disposition.attached_pic:  # cover art is not a video
            return s
    raise SampleError(DECODE_ERROR, "no video stream")


def _probe(container, first_frame: bool = True) -> tuple[Any, _Info]:
    """Stream facts. ``first_frame=False`` skips decoding the first frame (which opens the decoder and
    reads the display rotation): the PyAV sampler opens the decoder itself, with the threading its plan
    wants, and takes the rotation from the frames it decodes (``rotation`` stays 0 until then)."""
    stream = _video_stream(container)
    cc = stream.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width <= 0 or height <= 0:
        raise SampleError(DECODE_ERROR, "video stream without dimensions")
    if width * height > MAX_PIXELS:
        raise SampleError(DECODE_ERROR, f"frame {width}x{height} exceeds {MAX_PIXELS} pixels")
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / 1e6 - max(0.0, start - (container.start_time or 0) / 1e6)
    else:
        duration = 0.0
    rotation = 0
    if first_frame:
        _set_threads(stream, DECODE_THREADS)
        first = _first_frame(container, stream)
        if first is None:
            raise SampleError(DECODE_ERROR, "no decodable frame")
        rotation = _rotation(first)
    if duration <= 0:  # e.g. live-written webm: find the last packet's end by demuxing
        duration = _demux_end(container, stream) - start
        if duration <= 0:
            raise SampleError(DECODE_ERROR, "unknown duration")
    frames = int(stream.frames or 0) or (round(duration * fps) if fps else 0)
    if not fps and frames:
        fps = frames / duration
    info = _Info(duration=duration, fps=fps, num_frames=frames, width=width, height=height,
                 rotation=rotation, codec=cc.name or "", start=start)
    return stream, info


def _set_threads(stream, threads: int) -> None:
    """Decoder threading; only effective before the decoder opens (on the first decode)."""
    if threads > 1:
        stream.thread_type = DECODE_THREAD_TYPE
    stream.thread_count = threads


def _rotation(frame) -> int:
    return int(round(frame.rotation or 0)) % 360


def _first_frame(container, stream):
    """The first decodable frame (its side data carries the display rotation), or None."""
    import av

    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError:
        return None
    return None


def _demux_end(container, stream) -> float:
    end = 0.0
    tb = stream.time_base
    for pkt in container.demux(stream):
        if pkt.pts is not None:
            end = max(end, float((pkt.pts + (pkt.duration or 0)) * tb))
    return end


def _probe_file(path: str) -> dict:
    with _open(path) as container:
        return _probe(container)[1].public()


@dataclass
class _Packet:
    pts: float   # seconds relative to the stream start
    key: bool
    ts: int | None = None  # the packet's own pts in stream time base (None when the demuxer gave none)


# Packets demuxed past the first keyframe after the last sample time: frames that precede that keyframe
# in display order but follow it in decode order (open-GOP leading pictures) are still listed.
_SCAN_TAIL_PACKETS = 16


def _scan(container, stream, info: _Info, lo: float, hi: float) -> list[_Packet]:
    """Demux (no decode) from the keyframe before ``lo`` until past ``hi``: pts + keyframe flags."""
    tb = stream.time_base
    _seek(container, stream, info, lo)
    out: list[_Packet] = []
    tail = -1
    for pkt in container.demux(stream):
        if pkt.pts is None and pkt.dts is None:
            continue  # the flush packet at EOF
        if pkt.is_discard or pkt.is_corrupt:
            continue
        ts = pkt.pts if pkt.pts is not None else pkt.dts
        t = float(ts * tb) - info.start
        out.append(_Packet(t, bool(pkt.is_keyframe), pkt.pts))
        if tail >= 0:
            tail += 1
            if tail >= _SCAN_TAIL_PACKETS:
                break
        elif t > hi and pkt.is_keyframe:
            tail = 0  # past the clip end by a keyframe: only leading pictures can still show before hi
    return out


def _seek(container, stream, info: _Info, t: float) -> None:
    tb = stream.time_base
    target = int(math.floor((t + info.start) / tb)) if tb else 0
    container.seek(max(target, 0) if info.start >= 0 else target, stream=stream, backward=True, any_frame=False)


def _resolve_clip(info: _Info, clip_start: float | None, clip_end: float | None,
                  opts: VideoOptions) -> tuple[float, float, bool]:
    start = max(0.0, float(clip_start or 0.0))
    if start >= info.duration:
        raise SampleError(CLIP_OUT_OF_RANGE, f"clip start {start:.3f}s >= duration {info.duration:.3f}s")
    end = info.duration if clip_end is None else float(clip_end)
    clipped = end > info.duration + 1e-3
    end = min(end, info.duration)
    if end - start < opts.min_duration or end <= start:
        raise SampleError(TOO_SMALL, f"clip {end - start:.3f}s shorter than min_duration {opts.min_duration}s")
    return start, end, clipped


def _process_in_worker(path: str, key: str, opts: VideoOptions, clip_start: float | None,
                       clip_end: float | None) -> tuple[list[bytes], dict, bytes | None]:
    deadline = time.monotonic() + opts.timeout_s
    with _open(path) as container:
        # The PyAV sampler reads the rotation from the frames it decodes; ffmpeg needs it up front.
        stream, info = _probe(container, first_frame=opts.backend != "pyav")
        start, end, clipped = _resolve_clip(info, clip_start, clip_end, opts)
        times = sample_times(opts.sampler, start, end, num_frames=opts.num_frames, fps=opts.fps,
                             max_frames=opts.max_frames, seed=opts.seed, key=key)
        packets = _scan(container, stream, info, start, times[-1])
        pts = sorted(p.pts for p in packets)
        if not pts:
            raise SampleError(DECODE_ERROR, "no video packets in the clip span")
        if opts.backend == "pyav":
            chosen = _decode_pyav(container, stream, info, packets, times, opts)
        else:
            chosen = None
    if chosen is None:
        chosen = _decode_ffmpeg(path, info, pts, times, opts, deadline)
    frame_times, frames = [], []
    cache: dict[float, bytes] = {}
    for t, img in chosen:
        if t not in cache:  # the PyAV path hands over finished JPEGs (futures), ffmpeg's hands images
            cache[t] = img.result() if isinstance(img, Future) else encode_jpeg(
                resize(img, opts.size, opts.resize_mode), opts.jpeg_quality)
        frames.append(cache[t])
        frame_times.append(round(t, 3))
    meta = {"num_frames": len(frames), "frame_times": frame_times, "sampler": opts.sampler,
            "fps": round(info.fps, 3), "duration": round(info.duration, 3), "clip_start": round(start, 3),
            "clip_end": round(end, 3), "clip_end_clipped": clipped, "width": info.width, "height": info.height,
            "rotation": info.rotation, "padded": len(cache) < len(times), "backend": opts.backend}
    mp4 = _reencode(path, info, start, end, opts, deadline) if opts.keep_video else None
    return frames, meta, mp4


def _plan_runs(packets: list[_Packet], times: list[float]) -> list[tuple[float, list[float]]]:
    """Group sample times into (seek time, times) runs: decode sequentially within, seek between.

    Cost model in decoded frames (decode order): continuing from the current position to the packet
    that shows ``t`` vs seeking to ``t``'s keyframe and decoding from there plus a fixed seek cost.
    """
    key_idx = [i for i, p in enumerate(packets) if p.key] or [0]
    key_pts = [packets[i].pts for i in key_idx]
    # last decode-order index whose pts <= t: a running max over decode order makes it monotone
    need_pts, best = [], -math.inf
    for p in packets:
        best = max(best, p.pts)
        need_pts.append(best)
    runs: list[tuple[float, list[float]]] = []
    pos = -1
    for t in times:
        k = key_idx[max(bisect.bisect_right(key_pts, t + 1e-6) - 1, 0)]
        n = max(bisect.bisect_right(need_pts, t + 1e-6) - 1, k)
        if runs and (k <= pos or (n - pos) <= (n - k) + SEEK_COST_FRAMES):
            runs[-1][1].append(t)
            pos = max(pos, n)
        else:
            runs.append((packets[k].pts, [t]))
            pos = n
    return runs


def _coded_target_size(w: int, h: int, rotation: int, size: int, mode: str) -> tuple[int, int]:
    """The size to scale a coded ``w`` x ``h`` frame to so that, once turned upright by ``rotation``, it is
    what :func:`pipelines.resize.resize` would scale the upright frame to before crop/pad."""
    if rotation in (90, 270):
        uw, uh = scaled_size(h, w, size, mode)
        return uh, uw
    return scaled_size(w, h, size, mode)


class _FrameScaler:
    """Decoded frame -> upright RGB image already at the resize target (one swscale pass).

    swscale converts YUV to RGB and scales in one step, bicubic with full chroma interpolation
    (``FULL_CHR_H_INT``: no nearest-neighbour chroma upsampling), so :func:`pipelines.resize.resize`
    afterwards only crops or pads. The display rotation is read from the first frame seen.
    :meth:`submit` does scale + crop/pad + JPEG on a helper thread (swscale and Pillow's encoder release
    the GIL), overlapping the decoder, which keeps running on the calling thread.
    """

    def __init__(self, opts: VideoOptions, pool: Executor | None = None) -> None:
        from av.video.reformatter import Interpolation, VideoReformatter

        self.size, self.mode, self.quality = opts.size, opts.resize_mode, opts.jpeg_quality
        self.pool = pool
        self.flags = Interpolation.BICUBIC | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND  # SWS_FLAGS
        self.reformatter = VideoReformatter()  # caches the swscale context across frames
        self.rotation: int | None = None

    def see(self, frame) -> None:
        if self.rotation is None:
            self.rotation = _rotation(frame)

    def __call__(self, frame) -> Any:
        self.see(frame)
        rot = self.rotation
        tw, th = _coded_target_size(frame.width, frame.height, rot, self.size, self.mode)
        img = self.reformatter.reformat(frame, width=tw, height=th, format="rgb24",
                                        interpolation=self.flags, threads=1).to_image()
        if rot:
            img = img.rotate(rot, expand=True)  # display matrix angle is counter-clockwise
        return img

    def submit(self, frame) -> Future:
        """JPEG bytes of the finished frame, as a future (computed inline without a pool)."""
        self.see(frame)  # the rotation is fixed by the first frame, on the calling thread
        if self.pool is None:
            done: Future = Future()
            done.set_result(self._jpeg(frame))
            return done
        return self.pool.submit(self._jpeg, frame)

    def _jpeg(self, frame) -> bytes:
        return encode_jpeg(resize(self(frame), self.size, self.mode), self.quality)


def _decode_threads(info: _Info, packets: list[_Packet], runs: list[tuple[float, list[float]]]) -> int:
    """Frame threading pays on large frames and long runs only. Each frame costs a hand-off between
    threads, which small frames don't amortise (176x144 to 640x360 x264 clips: two threads decode no
    faster than one, and 15-20 % slower once non-reference frames are skipped; 1280x720: 1.45x
    faster); and after every seek the pipeline refills (one extra frame per thread), so a plan of very
    short runs decodes single-threaded too."""
    if info.width * info.height < THREADED_MIN_PIXELS:
        return 1
    index = {p.pts: i for i, p in enumerate(packets)}
    spans = []
    for seek_t, run in runs:
        first = index.get(seek_t, 0)
        spans.append(max(index.get(p, first) for p in _shown_pts(packets, run)) - first + 1)
    return DECODE_THREADS if sum(spans) / len(spans) >= THREADED_MIN_FRAMES_PER_RUN else 1


def _shown_pts(packets: list[_Packet], times: list[float]) -> list[float]:
    pts = sorted(p.pts for p in packets)
    return [pts[i] for i in pick_frames(pts, times)]


def _decode_pyav(container, stream, info: _Info, packets: list[_Packet], times: list[float],
                 opts: VideoOptions) -> list[tuple[float, Any]]:
    """The frame shown at each time (upright, scaled): exact-pts fast path, sequential fallback."""
    import av

    runs = _plan_runs(packets, times)
    _set_threads(stream, _decode_threads(info, packets, runs))
    chosen = None
    if all(p.ts is not None for p in packets) and len({p.ts for p in packets}) == len(packets):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frame-jpeg") as pool:
            scaler = _FrameScaler(opts, pool if OVERLAP_ENCODE else None)
            try:
                chosen = _decode_exact(container, stream, info, packets, times, runs, scaler)
            except av.FFmpegError as e:  # corrupt data: the sequential path keeps what decodes
                log.debug("exact decode failed (%s), decoding sequentially", e)
        stream.codec_context.skip_frame = "DEFAULT"
    if chosen is None:
        scaler = _FrameScaler(opts)
        chosen = _decode_sequential(container, stream, info, runs, times, scaler)
    info.rotation = scaler.rotation or 0
    return chosen


def _decode_exact(container, stream, info: _Info, packets: list[_Packet], times: list[float],
                  runs: list[tuple[float, list[float]]], scaler: _FrameScaler) -> list[tuple[float, Any]] | None:
    """Decode only what the sampled frames need; None if a planned frame never came out.

    The scan already knows each frame's pts, so each time maps to the pts of the frame displayed then
    (the last pts <= t, the rule of :func:`pick_frames`). For codecs in :data:`_NONREF_SAFE_CODECS`
    the decoder skips frames nothing references (``skip_frame=NONREF``, set per packet) unless one is
    wanted: skipped frames change no other frame's pixels, so the output equals a full decode.
    """
    by_pts = sorted(packets, key=lambda p: p.ts)
    idx = pick_frames([p.pts for p in by_pts], times)
    want = {t: by_pts[i].ts for t, i in zip(times, idx)}
    secs = {p.ts: p.pts for p in packets}
    cc = stream.codec_context
    skippable = "NONREF" if info.codec in _NONREF_SAFE_CODECS else "DEFAULT"
    images: dict[int, Any] = {}
    for seek_t, run in runs:
        need = {want[t] for t in run} - images.keys()
        if not need:
            continue
        last = max(need)
        _seek(container, stream, info, seek_t)
        skip = None
        tail = -1
        for pkt in container.demux(stream):
            ts = pkt.pts
            mode = "DEFAULT" if ts is None or ts in need else skippable
            if mode != skip:
                cc.skip_frame = skip = mode
            for frame in cc.decode(pkt):
                if frame.pts in need:
                    images[frame.pts] = scaler.submit(frame)
                    need.discard(frame.pts)
                else:
                    scaler.see(frame)
            if not need:
                break
            if tail >= 0:
                tail += 1
                if tail > _SCAN_TAIL_PACKETS + 16:  # well past every planned frame: it won't come
                    break
            elif ts is not None and ts > last and pkt.is_keyframe:
                tail = 0
        if need:
            log.debug("exact decode: pts %s never decoded, decoding sequentially", sorted(need)[:3])
            return None
    return [(secs[want[t]], images[want[t]]) for t in times]


def _decode_sequential(container, stream, info: _Info, runs: list[tuple[float, list[float]]],
                       times: list[float], scaler: _FrameScaler) -> list[tuple[float, Any]]:
    """Decode every frame of each run and keep, per time, the last frame whose pts <= t.

    For streams the exact path can't plan (missing or duplicate pts) and for corrupt data: a decoder
    error ends the run and the remaining times repeat the last frame decoded.
    """
    import av

    tb = stream.time_base
    fallback_dt = 1.0 / info.fps if info.fps else 0.04
    chosen: dict[float, tuple[float, Any]] = {}
    images: dict[float, Any] = {}

    for seek_t, run in runs:
        _seek(container, stream, info, seek_t)
        pending = list(run)
        prev: tuple[float, Any] | None = None
        last_t = None
        try:
            for frame in container.decode(stream):
                ft = float(frame.pts * tb) - info.start if frame.pts is not None else (
                    (last_t + fallback_dt) if last_t is not None else 0.0)
                last_t = ft
                while pending and ft > pending[0] + 1e-6:
                    src = prev if prev is not None else (ft, frame)
                    if src[0] not in images:
                        images[src[0]] = scaler(src[1])
                    chosen[pending.pop(0)] = (src[0], images[src[0]])
                prev = (ft, frame)
                if not pending:
                    break
        except av.FFmpegError as e:  # corrupt/truncated data: keep what decoded so far
            log.warning("decode stopped early at %.3fs: %s", last_t or 0.0, e)
        if pending:
            if prev is None and not chosen:
                raise SampleError(DECODE_ERROR, "zero decodable frames in the clip span")
            src = prev if prev is not None else max(chosen.values(), key=lambda v: v[0])
            if src[0] not in images:
                images[src[0]] = scaler(src[1])
            for t in pending:
                chosen[t] = (src[0], images[src[0]])
    return [chosen[t] for t in times]


def _decode_ffmpeg(path: str, info: _Info, pts: list[float], times: list[float], opts: VideoOptions,
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
    w, h = _coded_target_size(info.width, info.height, rot, opts.size, opts.resize_mode)
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
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _reencode(path: str, info: _Info, start: float, end: float, opts: VideoOptions, deadline: float) -> bytes:
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
