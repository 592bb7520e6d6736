"""One video's job inside the worker: probe, sample times, scan packets, decode with the chosen backend,
JPEG-encode, and (optionally) re-encode the clip span as mp4."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from pipelines.errors import DECODE_ERROR, INTERNAL_ERROR, SampleError
from pipelines.resize import encode_jpeg, resize
from pipelines.video.ffmpeg_backend import decode_ffmpeg, reencode
from pipelines.video.options import VideoOptions
from pipelines.video.probe import open_container, probe_container, probe_file, resolve_clip, scan_packets
from pipelines.video.pyav_backend import decode_pyav
from pipelines.video.sampling import sample_times

log = logging.getLogger(__name__)


def process_in_worker(path: str, key: str, opts: VideoOptions, clip_start: float | None,
                       clip_end: float | None) -> tuple[list[bytes], dict, bytes | None]:
    deadline = time.monotonic() + opts.timeout_s
    with open_container(path) as container:
        # The PyAV sampler reads the rotation from the frames it decodes; ffmpeg needs it up front.
        stream, info = probe_container(container, first_frame=opts.backend != "pyav")
        start, end, clipped = resolve_clip(info, clip_start, clip_end, opts)
        times = sample_times(opts.sampler, start, end, num_frames=opts.num_frames, fps=opts.fps,
                             max_frames=opts.max_frames, seed=opts.seed, key=key)
        packets = scan_packets(container, stream, info, start, times[-1])
        pts = sorted(p.pts for p in packets)
        if not pts:
            raise SampleError(DECODE_ERROR, "no video packets in the clip span")
        if opts.backend == "pyav":
            chosen = decode_pyav(container, stream, info, packets, times, opts)
        else:
            chosen = None
    if chosen is None:
        chosen = decode_ffmpeg(path, info, pts, times, opts, deadline)
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
    mp4 = reencode(path, info, start, end, opts, deadline) if opts.keep_video else None
    return frames, meta, mp4


def handle(req: tuple) -> tuple:
    """One sandbox request (``probe`` or ``process``) -> ``("ok", result)`` or ``("err", reason, message)``."""
    import av

    try:
        if req[0] == "probe":
            return ("ok", probe_file(req[1]))
        _, path, key, opts_d, clip_start, clip_end, stall = req
        if stall:
            time.sleep(stall)
        return ("ok", process_in_worker(path, key, VideoOptions(**opts_d), clip_start, clip_end))
    except SampleError as e:
        return ("err", e.reason, e.message)
    except (av.FFmpegError, UnicodeDecodeError, EOFError) as e:
        return ("err", DECODE_ERROR, f"{type(e).__name__}: {e}")
    except Exception as e:  # a bug: type and message recorded (data-contract §11)
        log.exception("internal error decoding %s", req[1])
        return ("err", INTERNAL_ERROR, f"{type(e).__name__}: {e}")
