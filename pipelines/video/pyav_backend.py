"""In-process PyAV decoding of the planned frames: runs of sequential decoding between seeks (cost model in
decoded frames), non-reference frames skipped where that is bit-exact, one swscale pass per frame (YUV ->
upright RGB at the resize target), JPEG encoding overlapped with decoding on a helper thread."""

from __future__ import annotations

import bisect
import logging
import math
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from pipelines.errors import DECODE_ERROR, SampleError
from pipelines.resize import encode_jpeg, resize
from pipelines.video.options import VideoOptions
from pipelines.video.probe import (DECODE_THREADS, SCAN_TAIL_PACKETS, Packet, StreamInfo, coded_target_size,
                                   frame_rotation, seek, set_threads)
from pipelines.video.sampling import pick_frames

log = logging.getLogger(__name__)

# Seeking costs a decoder flush plus refilling the threading pipeline; expressed in decoded frames.
SEEK_COST_FRAMES = 6
# ``skip_frame=NONREF`` leaves every other frame bit-exact. Not HEVC: its sub-layer non-reference pictures
# may still be referenced by higher temporal sub-layers.
_NONREF_SAFE_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4"})
# Scale + JPEG-encode chosen frames on a helper thread while the decoder continues (see FrameScaler).
OVERLAP_ENCODE = True
# Below this frame size, or this many packets per planned run, the decoder runs single-threaded
# (see decode_threads).
THREADED_MIN_PIXELS = 640 * 480
THREADED_MIN_FRAMES_PER_RUN = 4


def plan_runs(packets: list[Packet], times: list[float]) -> list[tuple[float, list[float]]]:
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



class FrameScaler:
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
            self.rotation = frame_rotation(frame)

    def __call__(self, frame) -> Any:
        self.see(frame)
        rot = self.rotation
        tw, th = coded_target_size(frame.width, frame.height, rot, self.size, self.mode)
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


def decode_threads(info: StreamInfo, packets: list[Packet], runs: list[tuple[float, list[float]]]) -> int:
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


def _shown_pts(packets: list[Packet], times: list[float]) -> list[float]:
    pts = sorted(p.pts for p in packets)
    return [pts[i] for i in pick_frames(pts, times)]


def decode_pyav(container, stream, info: StreamInfo, packets: list[Packet], times: list[float],
                 opts: VideoOptions) -> list[tuple[float, Any]]:
    """The frame shown at each time (upright, scaled): exact-pts fast path, sequential fallback."""
    import av

    runs = plan_runs(packets, times)
    set_threads(stream, decode_threads(info, packets, runs))
    chosen = None
    if all(p.ts is not None for p in packets) and len({p.ts for p in packets}) == len(packets):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frame-jpeg") as pool:
            scaler = FrameScaler(opts, pool if OVERLAP_ENCODE else None)
            try:
                chosen = decode_exact(container, stream, info, packets, times, runs, scaler)
            except av.FFmpegError as e:  # corrupt data: the sequential path keeps what decodes
                log.debug("exact decode failed (%s), decoding sequentially", e)
        stream.codec_context.skip_frame = "DEFAULT"
    if chosen is None:
        scaler = FrameScaler(opts)
        chosen = decode_sequential(container, stream, info, runs, times, scaler)
    info.rotation = scaler.rotation or 0
    return chosen


def decode_exact(container, stream, info: StreamInfo, packets: list[Packet], times: list[float],
                  runs: list[tuple[float, list[float]]], scaler: FrameScaler) -> list[tuple[float, Any]] | None:
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
        seek(container, stream, info, seek_t)
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
                if tail > SCAN_TAIL_PACKETS + 16:  # well past every planned frame: it won't come
                    break
            elif ts is not None and ts > last and pkt.is_keyframe:
                tail = 0
        if need:
            log.debug("exact decode: pts %s never decoded, decoding sequentially", sorted(need)[:3])
            return None
    return [(secs[want[t]], images[want[t]]) for t in times]


def decode_sequential(container, stream, info: StreamInfo, runs: list[tuple[float, list[float]]],
                       times: list[float], scaler: FrameScaler) -> list[tuple[float, Any]]:
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
        seek(container, stream, info, seek_t)
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
