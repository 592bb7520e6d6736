"""Object storage access shared by the pipelines, the loader and the trainer.

One rule for every component: a URL is either ``s3://bucket/key`` (through s3fs, endpoint and credentials
from the standard AWS environment variables) or a local path. Nothing here knows about Ray or models.

Environment (never put credentials in files or configs):

- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or an instance role),
- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for S3-compatible stores (SeaweedFS, MinIO),
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``).
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import fsspec

T = TypeVar("T")

__all__ = [
    "is_remote",
    "join",
    "get_fs",
    "s3_endpoint",
    "s3_storage_options",
    "pyarrow_fs",
    "atomic_write",
    "read_bytes",
    "exists",
    "remove",
    "retry_io",
]


def is_remote(url: str) -> bool:
    """True for ``s3://`` URLs (the only remote scheme for outputs)."""
    return str(url).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and ``s3://`` URLs alike."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_storage_options() -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem`` built from the environment."""
    opts: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        opts["endpoint_url"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    opts["client_kwargs"] = {"region_name": region}
    # Listings must reflect what other processes just committed (shards, checkpoints): no listing cache.
    opts["use_listings_cache"] = False
    # Retries with backoff for throttling (SlowDown / 503) and flaky connections.
    opts["config_kwargs"] = {"retries": {"max_attempts": 8, "mode": "adaptive"}}
    return opts


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL; the path is what the filesystem expects."""
    url = str(url)
    if is_remote(url):
        import s3fs

        # A fresh instance per endpoint/credential set; s3fs caches instances by arguments.
        fs = s3fs.S3FileSystem(**s3_storage_options())
        return fs, url[len("s3://"):]
    if url.startswith("file://"):
        url = urlparse(url).path
    return fsspec.filesystem("file"), os.path.abspath(url)


def pyarrow_fs(url: str):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Train's ``RunConfig(storage_filesystem=...)``.

    For S3 the path has no scheme (``bucket/prefix``), as pyarrow expects with an explicit filesystem.
    """
    import pyarrow.fs as pafs

    url = str(url)
    if not is_remote(url):
        return pafs.LocalFileSystem(), os.path.abspath(url)
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
    return pafs.S3FileSystem(**kwargs), url[len("s3://"):]


def retry_io(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.5, what: str = "io") -> T:
    """Run ``fn`` with exponential backoff on I/O errors (S3 throttling, a restarting server)."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (OSError, TimeoutError, ConnectionError) as exc:  # s3fs raises OSError subclasses
            if isinstance(exc, (FileNotFoundError, PermissionError)) or attempt == attempts:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def atomic_write(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the complete object.

    Local: write ``<name>.partial.<uuid>``, fsync, ``os.replace``. S3: one PUT (or multipart upload),
    which becomes visible only when complete.
    """
    fs, path = get_fs(url)
    if is_remote(url):
        retry_io(lambda: fs.pipe_file(path, data), what=f"put {url}")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.partial.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    return retry_io(lambda: fs.cat_file(path), what=f"get {url}")


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return bool(retry_io(lambda: fs.exists(path), what=f"head {url}"))


def remove(url: str) -> None:
    """Delete one object or file if present."""
    fs, path = get_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
