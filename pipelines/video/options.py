"""What to sample and how to encode it (:class:`VideoOptions`), the result type, and the safety limits
both decoders share (protocol / demuxer whitelists, the 8K pixel cap)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.errors import ConfigError
from pipelines.resize import RESIZE_MODES

SAMPLERS = ("middle", "random_segment", "fps")
BACKENDS = ("pyav", "ffmpeg")
MAX_FRAMES = 1000  # three-digit field names f000..f999
PROTOCOL_WHITELIST = "file,pipe"
# Demuxer short names of this ffmpeg (`ffmpeg -demuxers`); "mov" matches "mov,mp4,m4a,3gp,3g2,mj2".
FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpegts,flv"
MAX_PIXELS = 7680 * 4320  # 8K: larger frames are refused (decompression-bomb guard)


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

