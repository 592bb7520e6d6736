"""One user's media item (local path, ``file://``, ``s3://``, ``http(s)://``; image or video) -> PIL frames.

Everything goes through the preprocessing pipeline's own code, so inference sees what evaluation saw:
:class:`pipelines.fetch.Fetcher` (timeouts, size cap, 404 = ``not_found``), :func:`pipelines.image.process_image`
for still images, and :func:`pipelines.video.process_video` for videos (probe, the ``middle`` sampler, one-pass
resize, JPEG at the shard quality) in its killable worker sandbox with the ``file,pipe`` protocol whitelist, so a
playlist disguised as ``.mp4`` cannot read other files or the network. The options' defaults are preprocessing's.

Every failure of one item is a :class:`MediaError` carrying the pipeline's reason code and a one-line message;
callers report it and go on with the other items.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

from PIL import Image

from pipelines.errors import INVALID_INPUT, NOT_FOUND, SampleError
from pipelines.fetch import Fetcher, FetchOptions
from pipelines.image import ImageOptions, process_image
from pipelines.video import VideoOptions, process_video

__all__ = ["IMAGE_FORMATS", "Media", "MediaError", "MediaLoader", "MediaOptions"]

# Still-image containers decoded as images; anything else (including animated GIF/WebP) goes to the video decoder.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"})


class MediaError(Exception):
    """One item could not be loaded; ``reason`` is a :data:`pipelines.errors.REASONS` code."""

    def __init__(self, source: str, reason: str, message: str) -> None:
        self.source, self.reason, self.message = source, reason, " ".join(str(message).split())
        super().__init__(f"{source}: {reason}: {self.message}")


@dataclass
class Media:
    source: str
    modality: str                      # "image" | "video"
    frames: list[Image.Image]          # RGB, temporal order; one frame for an image
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MediaOptions:
    """How items are read; every default is the preprocessing default (``pipelines.config.PreprocessConfig``)."""

    num_frames: int = 8
    fetch: FetchOptions = field(default_factory=FetchOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    frame_size: int = 224
    frame_resize_mode: str = "center_crop"
    video_backend: str = "pyav"
    video_timeout_s: float = 60.0

    def video_options(self) -> VideoOptions:
        return VideoOptions(num_frames=self.num_frames, sampler="middle", size=self.frame_size,
                            resize_mode=self.frame_resize_mode, backend=self.video_backend,
                            timeout_s=self.video_timeout_s, jpeg_quality=self.image.jpeg_quality)


def _still_image_format(head: bytes | str) -> str | None:
    """The PIL format when ``head`` (bytes or a path) is a single still image, else None. Reads the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head) if isinstance(head, bytes) else head) as img:
                if img.format not in IMAGE_FORMATS or getattr(img, "n_frames", 1) > 1:
                    return None
                return img.format
    except Exception:  # not an image Pillow knows: the video decoder decides
        return None


def _jpeg_frames(jpegs: list[bytes]) -> list[Image.Image]:
    out = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as img:
            out.append(img.convert("RGB"))
    return out


class MediaLoader:
    """Loads items one at a time; reuse one loader for many items (pooled HTTP connections)."""

    def __init__(self, opts: MediaOptions | None = None) -> None:
        self.opts = opts or MediaOptions()
        self.fetcher = Fetcher(self.opts.fetch)

    def close(self) -> None:
        self.fetcher.close()

    def __enter__(self) -> "MediaLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, source: str) -> Media:
        """Frames of ``source``, or :class:`MediaError`."""
        try:
            return self._load(source)
        except SampleError as exc:
            raise MediaError(source, exc.reason, exc.message) from None

    def _load(self, source: str) -> Media:
        if not source:
            raise SampleError(INVALID_INPUT, "empty source")
        local = self.fetcher.local_path(source)
        if local is not None:
            if not os.path.exists(local):
                raise SampleError(NOT_FOUND, f"no such file: {local}")
            if os.path.isdir(local):
                raise SampleError(INVALID_INPUT, f"{local} is a directory")
            if _still_image_format(local):
                return self._image(source, self.fetcher.fetch(source).data)
            return self._video(source, local)
        data = self.fetcher.fetch(source).data
        if _still_image_format(data):
            return self._image(source, data)
        tmp = tempfile.mkdtemp(prefix="mplug2-media-")
        try:
            path = os.path.join(tmp, "media")
            with open(path, "wb") as f:
                f.write(data)
            return self._video(source, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _image(self, source: str, data: bytes) -> Media:
        sample = process_image(data, self.opts.image)
        return Media(source, "image", _jpeg_frames([sample.jpg]), sample.meta)

    def _video(self, source: str, path: str) -> Media:
        vs = process_video(path, key=source, opts=self.opts.video_options())
        return Media(source, "video", _jpeg_frames(vs.frames), vs.meta)
