"""Object storage access shared by the pipelines, the loader and the trainer.

One rule for every component: a URL is either ``s3://bucket/key`` (through s3fs, endpoint and credentials
from the standard AWS environment variables) or a local path. Nothing here knows about Ray or models.

Environment (never put credentials in configs or Ray runtime envs):

- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, or ``AWS_SHARED_CREDENTIALS_FILE`` naming a 0600
  credentials file, or an instance role (missing credentials raise :class:`StorageCredentialsError` at once),
- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for S3-compatible stores (SeaweedFS, MinIO),
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``),
- ``MPLUG2_S3_RETRY_DEADLINE_S``: how long :func:`retry_io` keeps retrying a failing S3 call (default 120 s,
  enough for an S3 server restart); past it the call fails with :class:`StorageUnavailableError`.

Outages: botocore retries a call only briefly (3 attempts, ~5 s against a dead endpoint); :func:`retry_io`
then retries with exponential backoff until the deadline, logging every failed attempt, and drops the cached
s3fs instances after a failure so the next attempt builds a fresh client (connections, credentials).
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import fsspec

T = TypeVar("T")

log = logging.getLogger(__name__)

RETRY_DEADLINE_ENV = "MPLUG2_S3_RETRY_DEADLINE_S"
DEFAULT_RETRY_DEADLINE_S = 120.0

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
    "size",
    "list_names",
    "upload_file",
    "download_file",
    "remove_tree",
    "retry_deadline_s",
    "reset_fs_cache",
    "StorageUnavailableError",
    "move",
    "StorageCredentialsError",
]


class StorageCredentialsError(PermissionError):
    """No usable S3 credentials in this process: an answer, not an outage, so never retried."""


CREDENTIALS_FIX = (
    "give this process and the Ray cluster's nodes S3 credentials: an instance role / service account, "
    "AWS_SHARED_CREDENTIALS_FILE naming a 0600 credentials file (`eval \"$(mplug2-s3 env --dir .s3)\"` for the "
    "embedded S3), or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment a `ray start` node was started "
    "with; jobs on a cluster without them need `mplug2-submit submit --forward-credentials`")


def _credential_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return ()
    return (NoCredentialsError, PartialCredentialsError)


class StorageUnavailableError(OSError):
    """Storage kept failing until :func:`retry_io` gave up (deadline or attempts spent); ``__cause__`` is the
    last error. An ``OSError``, so callers that handle I/O errors handle it; never retried again by an outer
    :func:`retry_io` (deadlines do not compound)."""


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
    # botocore retries throttling (SlowDown / 503) and flaky connections with backoff, briefly: against a dead
    # endpoint "adaptive" with 8 attempts blocked one call ~47 s (s3fs repeats the call 5 times), "standard"
    # with 3 fails it in ~5 s. Longer outages are retry_io's job (deadline, logged attempts, fresh client).
    opts["config_kwargs"] = {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 10}
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


def pyarrow_fs(url: str, **s3_options: Any):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Train's ``RunConfig(storage_filesystem=...)`` (S3:
    ``s3_options`` go to ``pyarrow.fs.S3FileSystem`` too).

    For S3 the path has no scheme (``bucket/prefix``), as pyarrow expects with an explicit filesystem.
    """
    import pyarrow.fs as pafs

    url = str(url)
    if not is_remote(url):
        return pafs.LocalFileSystem(), os.path.abspath(url)
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1", **s3_options
    }
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):       # temporary credentials are unusable without it
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs), url[len("s3://"):]


# pyarrow S3 filesystems for uploads, one per client environment; dropped by reset_fs_cache() after a failure
_ARROW_S3: dict[tuple[str | None, ...], Any] = {}


def _arrow_s3() -> Any:
    env = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                                            "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE"))
    fs = _ARROW_S3.get(env)
    if fs is None:
        # delayed open: a file smaller than one part goes up as one PutObject, not a 3-request multipart upload
        fs = _ARROW_S3[env] = pyarrow_fs("s3://", allow_delayed_open=True)[0]
    return fs


def retry_deadline_s() -> float:
    """Seconds :func:`retry_io` keeps retrying by default (``$MPLUG2_S3_RETRY_DEADLINE_S``, default 120)."""
    raw = os.environ.get(RETRY_DEADLINE_ENV)
    return float(raw) if raw else DEFAULT_RETRY_DEADLINE_S


def reset_fs_cache() -> None:
    """Forget cached s3fs instances: the next :func:`get_fs` builds a new client (fresh connection pool,
    credentials re-read). Instances already handed out keep working."""
    _ARROW_S3.clear()
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _retryable_types() -> tuple[type[BaseException], ...]:
    types: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
    try:   # not OSError subclasses: s3fs lets connection failures through untranslated
        from botocore.exceptions import BotoCoreError

        types += (BotoCoreError,)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        types += (ClientError,)
    except ImportError:
        pass
    return types


def retry_io(fn: Callable[[], T], *, attempts: int | None = None, deadline_s: float | None = None,
             base_delay: float = 0.5, max_delay: float = 10.0, what: str = "io") -> T:
    """Run ``fn`` with exponential backoff on I/O errors (S3 throttling, a restarting server, a dropped link).

    Gives up when ``attempts`` calls failed (if given) or when the next try would start after ``deadline_s``
    (default :func:`retry_deadline_s`), raising :class:`StorageUnavailableError` from the last error.
    ``FileNotFoundError``, ``PermissionError`` and ``IsADirectoryError`` are answers, not outages: raised at
    once. Every failed attempt is logged with its count and the time spent; after a failure the s3fs instance
    cache is dropped, so ``fn`` should call :func:`get_fs` itself to get a fresh client on the next attempt.
    """
    deadline = retry_deadline_s() if deadline_s is None else float(deadline_s)
    retryable = _retryable_types()
    t0 = time.monotonic()
    delay = base_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
        except StorageUnavailableError:
            raise
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except _credential_errors() as exc:     # retrying cannot make credentials appear
            raise StorageCredentialsError(f"{what}: no S3 credentials ({type(exc).__name__}); {CREDENTIALS_FIX}") from exc
        except retryable as exc:
            elapsed = time.monotonic() - t0
            if (attempts is not None and attempt >= attempts) or elapsed + delay > deadline:
                limit = f"{attempts} attempts" if attempts is not None and attempt >= attempts else \
                    f"the {deadline:.0f} s deadline (${RETRY_DEADLINE_ENV})"
                log.error("%s: giving up after %d attempts in %.1f s (%s); last error: %s: %s", what, attempt,
                          elapsed, limit, type(exc).__name__, exc)
                raise StorageUnavailableError(
                    f"{what}: storage still failing after {attempt} attempts in {elapsed:.1f} s, past {limit}; "
                    f"last error: {type(exc).__name__}: {exc}") from exc
            log.warning("%s: attempt %d failed after %.1f s (%s: %s); retrying in %.1f s", what, attempt,
                        elapsed, type(exc).__name__, exc, delay)
            reset_fs_cache()
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if attempt > 1:
            log.warning("%s: succeeded on attempt %d after %.1f s", what, attempt, time.monotonic() - t0)
        return result


def atomic_write(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the complete object.

    Local: write ``<name>.partial.<uuid>``, fsync, ``os.replace``. S3: one PUT (or multipart upload),
    which becomes visible only when complete.
    """
    if is_remote(url):
        _with_retries(url, "put", lambda fs, path: fs.pipe_file(path, data))
        return
    path = get_fs(url)[1]
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


def _with_retries(url: str, what: str, op: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
    """``op(fs, path)`` under :func:`retry_io` with a fresh filesystem per attempt. The retry budget: S3
    calls retry until the storage deadline (an S3 restart); local paths get a few quick tries (an NFS
    hiccup), not the outage deadline."""
    path = get_fs(url)[1]

    def attempt() -> T:
        fs = get_fs(url)[0]
        # s3fs caches one instance per thread, each with its own listing cache: a checkpoint uploaded from
        # a background thread must be visible to the next listing or size check in the training thread
        fs.invalidate_cache()
        return op(fs, path)

    return retry_io(attempt, attempts=None if is_remote(url) else 3, what=f"{what} {url}")


def read_bytes(url: str) -> bytes:
    return _with_retries(url, "get", lambda fs, path: fs.cat_file(path))


def exists(url: str) -> bool:
    return bool(_with_retries(url, "head", lambda fs, path: fs.exists(path)))


def size(url: str) -> int:
    return int(_with_retries(url, "size", lambda fs, path: fs.size(path)))


def list_names(url: str) -> list[str]:
    """Names (not paths) of the entries directly under a folder / prefix; ``FileNotFoundError`` if absent."""
    entries = _with_retries(url, "list", lambda fs, path: fs.ls(path, detail=False))
    return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]


# What pyarrow's S3 errors (OSError with the AWS error name in the text) mean when they are answers, not outages
_ARROW_ANSWERS: tuple[tuple[str, type[OSError]], ...] = (
    ("NO_SUCH_BUCKET", FileNotFoundError), ("ACCESS_DENIED", PermissionError),
    ("INVALID_ACCESS_KEY_ID", PermissionError), ("SIGNATURE_DOES_NOT_MATCH", PermissionError))


def upload_file(local: str, url: str) -> None:
    """Copy a local file to ``url`` (S3: one object, visible only when complete); the local file is kept.

    To S3 the bytes go through pyarrow's C++ client (``pyarrow.fs.S3FileSystem``), which reads, signs and sends
    without holding the GIL: s3fs runs that work as Python in the process's event-loop thread, and in a
    training process every such stretch delays the training thread's next torch call (checkpoint and log
    uploads run beside training; docs/benchmarks.md, issue 13). Retried like every call here
    (:func:`retry_io`: a fresh client per attempt, until the storage deadline).

    The file is memory-mapped: it may grow while it goes up (what was there when the attempt began is sent)
    but must not be truncated in place (a mapped page past the new end faults). Every caller uploads files that
    are complete or only appended to (checkpoint files, shards, logs: the loop waits for a log sync before it
    rewrites the metrics file)."""
    if not is_remote(url):
        _with_retries(url, "put", lambda fs, path: fs.put_file(local, path))
        return
    import pyarrow as pa

    def attempt() -> None:
        try:
            # not pyarrow.fs.copy_files: with a delayed open it drops the error of the final PUT. The file is
            # mapped, not read: the client sends from the page cache, with no copy into fresh Python buffers
            # (-35 ms of the trainer's CPU per 33 MiB checkpoint; docs/benchmarks.md, issue 13).
            with pa.memory_map(local) as src, _arrow_s3().open_output_stream(url[len("s3://"):], metadata={}) as out:
                out.write(src.read_buffer())      # no GIL held while the client buffers, signs and sends
        except OSError as exc:
            answer = next((kind for name, kind in _ARROW_ANSWERS if name in str(exc)), None)
            if answer is not None and type(exc) is not answer:
                raise answer(f"{url}: {exc}") from exc
            raise

    retry_io(attempt, what=f"put {url}")


def move(src: str, dst: str) -> None:
    """Move an object within one store (S3: server-side copy, then delete the source; safe to repeat)."""
    def op(fs: fsspec.AbstractFileSystem, path: str) -> None:
        dst_path = get_fs(dst)[1]
        if fs.exists(path):
            fs.copy(path, dst_path)
            fs.rm_file(path)
        elif not fs.exists(dst_path):
            raise FileNotFoundError(src)

    _with_retries(src, "move", op)


def download_file(url: str, local: str) -> None:
    _with_retries(url, "get", lambda fs, path: fs.get_file(path, local))


def remove(url: str) -> None:
    """Delete one object or file if present."""
    try:
        _with_retries(url, "delete", lambda fs, path: fs.rm_file(path))
    except FileNotFoundError:
        pass


def remove_tree(url: str) -> None:
    """Delete a folder / prefix and everything under it."""
    _with_retries(url, "delete", lambda fs, path: fs.rm(path, recursive=True))
    if is_remote(url):
        # Filer-backed S3 servers (SeaweedFS) keep the emptied folder, which would still be listed (a pruned
        # checkpoint that seems to exist); deleting its "<prefix>/" key removes it (a no-op on AWS S3).
        remove(url.rstrip("/") + "/")
