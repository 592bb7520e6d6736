"""Inside the worker: open a LOCAL file through PyAV with the protocol and demuxer whitelists, read the video
stream's facts (duration, rate, size, rotation), list packets (pts, keyframe) over a span, seek, and resolve
the clip span. Both backends plan from these facts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from pipelines.errors import CLIP_OUT_OF_RANGE, DECODE_ERROR, TOO_SMALL, SampleError
from pipelines.resize import scaled_size
from pipelines.video.options import FORMAT_WHITELIST, MAX_PIXELS, PROTOCOL_WHITELIST, VideoOptions

DECODE_THREADS = 2
DECODE_THREAD_TYPE = "AUTO"  # frame + slice threading


@dataclass
class StreamInfo:
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


def open_container(path: str):
    import av

    try:
        return av.open("file:" + os.path.abspath(path), mode="r", metadata_errors="ignore",
                       container_options={"protocol_whitelist": PROTOCOL_WHITELIST,
                                          "format_whitelist": FORMAT_WHITELIST})
    except av.FFmpegError as e:
        raise SampleError(DECODE_ERROR, f"cannot open as video: {e}") from None


def video_stream(container):
    import av

    for s in container.streams.video:
        if not s.disposition & av.stream.Disposition.attached_pic:  # cover art is not a video
            return s
    raise SampleError(DECODE_ERROR, "no video stream")


def probe_container(container, first_frame: bool = True) -> tuple[Any, StreamInfo]:
    """Stream facts. ``first_frame=False`` skips decoding the first frame (which opens the decoder and
    reads the display rotation): the PyAV sampler opens the decoder itself, with the threading its plan
    wants, and takes the rotation from the frames it decodes (``rotation`` stays 0 until then)."""
    stream = video_stream(container)
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
        set_threads(stream, DECODE_THREADS)
        first = _first_frame(container, stream)
        if first is None:
            raise SampleError(DECODE_ERROR, "no decodable frame")
        rotation = frame_rotation(first)
    if duration <= 0:  # e.g. live-written webm: find the last packet's end by demuxing
        duration = _demux_end(container, stream) - start
        if duration <= 0:
            raise SampleError(DECODE_ERROR, "unknown duration")
    frames = int(stream.frames or 0) or (round(duration * fps) if fps else 0)
    if not fps and frames:
        fps = frames / duration
    info = StreamInfo(duration=duration, fps=fps, num_frames=frames, width=width, height=height,
                 rotation=rotation, codec=cc.name or "", start=start)
    return stream, info


def set_threads(stream, threads: int) -> None:
    """Decoder threading; only effective before the decoder opens (on the first decode)."""
    if threads > 1:
        stream.thread_type = DECODE_THREAD_TYPE
    stream.thread_count = threads


def frame_rotation(frame) -> int:
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


def probe_file(path: str) -> dict:
    with open_container(path) as container:
        return probe_container(container)[1].public()


@dataclass
class Packet:
    pts: float   # seconds relative to the stream start
    key: bool
    ts: int | None = None  # the packet's own pts in stream time base (None when the demuxer gave none)


# Packets demuxed past the first keyframe after the last sample time: frames that precede that keyframe
# in display order but follow it in decode order (open-GOP leading pictures) are still listed.
SCAN_TAIL_PACKETS = 16


def scan_packets(container, stream, info: StreamInfo, lo: float, hi: float) -> list[Packet]:
    """Demux (no decode) from the keyframe before ``lo`` until past ``hi``: pts + keyframe flags."""
    tb = stream.time_base
    seek(container, stream, info, lo)
    out: list[Packet] = []
    tail = -1
    for pkt in container.demux(stream):
        if pkt.pts is None and pkt.dts is None:
            continue  # the flush packet at EOF
        if pkt.is_discard or pkt.is_corrupt:
            continue
        ts = pkt.pts if pkt.pts is not None else pkt.dts
        t = float(ts * tb) - info.start
        out.append(Packet(t, bool(pkt.is_keyframe), pkt.pts))
        if tail >= 0:
            tail += 1
            if tail >= SCAN_TAIL_PACKETS:
                break
        elif t > hi and pkt.is_keyframe:
            tail = 0  # past the clip end by a keyframe: only leading pictures can still show before hi
    return out


def seek(container, stream, info: StreamInfo, t: float) -> None:
    tb = stream.time_base
    target = int(math.floor((t + info.start) / tb)) if tb else 0
    container.seek(max(target, 0) if info.start >= 0 else target, stream=stream, backward=True, any_frame=False)


def resolve_clip(info: StreamInfo, clip_start: float | None, clip_end: float | None,
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



def coded_target_size(w: int, h: int, rotation: int, size: int, mode: str) -> tuple[int, int]:
    """The size to scale a coded ``w`` x ``h`` frame to so that, once turned upright by ``rotation``, it is
    what :func:`pipelines.resize.resize` would scale the upright frame to before crop/pad."""
    if rotation in (90, 270):
        uw, uh = scaled_size(h, w, size, mode)
        return uh, uw
    return scaled_size(w, h, size, mode)
