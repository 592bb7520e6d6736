"""Fetch media bytes from local paths, ``file://``, ``s3://`` and ``http(s)://`` with honest failure reasons.

Content is validated, not trusted (data-contract §11): an HTTP 404 page is ``not_found`` (never a sample),
other non-2xx statuses are ``download_error`` (retried with backoff for 429/5xx and connection errors),
bodies are capped at ``max_bytes`` *while streaming*, and ``X-Robots-Tag: noai``/``noindex`` is honoured
as ``opted_out``, as img2dataset does. One pooled keep-alive ``urllib3.PoolManager`` serves all threads of a
shard task (urllib3 pools are thread-safe; requests costs ~3x the CPU per small GET).
"""

from __future__ import annotations

import os
import posixpath
import random
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from mplug2 import storage
from pipelines.errors import (DOWNLOAD_ERROR, INVALID_INPUT, NOT_FOUND, NOT_MEDIA, OPTED_OUT, TIMEOUT,
                              TOO_LARGE, SampleError)

# Directives that opt a page out of AI training / indexing (img2dataset's default disallow list).
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_CHUNK = 1 << 18
# Content types that are never an image or a video, whatever the body (a CDN's error or consent page).
_NON_MEDIA_TYPES = ("text/html", "application/xhtml+xml", "application/json", "text/xml", "application/xml")
# The first bytes of text documents (after optional whitespace / BOM), lower-cased.
_TEXT_MAGIC = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


def non_media_reason(data: bytes, content_type: str | None, url: str) -> SampleError | None:
    """``not_media`` when a body is a web page / JSON / XML rather than media (HTML served with status 200
    for an image is common: expired links, consent walls, soft 404s), judged from the Content-Type and
    from the body's first bytes, before any decoder sees it. The message names the type and the URL."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if ctype in _NON_MEDIA_TYPES:
        return SampleError(NOT_MEDIA, f"{ctype} body, not media, from {url}")
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(_TEXT_MAGIC):
        kind = "XML" if head.startswith(b"<?xml") else "HTML"
        return SampleError(NOT_MEDIA, f"{kind} body (Content-Type {ctype or 'none'}), not media, from {url}")
    return None


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float = 10.0
    retries: int = 2  # extra attempts for retryable errors (429, 5xx, connection errors)
    max_bytes: int = 256 << 20
    honor_robots: bool = True
    user_agent: str = "mplug2-ray/0.1"
    backoff_s: float = 0.25
    pool_size: int = 32


@dataclass
class Fetched:
    data: bytes
    attempts: int
    url: str


def resolve_source(url: str, media_root: str | None = None, manifest_path: str | None = None) -> str:
    """Make a relative local path absolute: against ``media_root`` if given, else the manifest's folder."""
    if "://" in url or os.path.isabs(url):
        return url
    base = media_root or (posixpath.dirname(manifest_path) if manifest_path else None)
    if not base:
        return os.path.abspath(url)
    return storage.join(base, url)


def robots_opt_out(header_values: list[str], agent_token: str = "mplug2-ray") -> bool:
    """True if an ``X-Robots-Tag`` header forbids use by all agents or by ours.

    ``X-Robots-Tag: googlebot: noindex`` only binds Google; ``noai`` and ``otherbot: none`` apply as named.
    """
    for value in header_values:
        for part in value.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if ":" in part:
                agent, _, directive = part.partition(":")
                if agent.strip() not in ("*", agent_token.lower()):
                    continue
                part = directive.strip()
            if part in OPT_OUT_DIRECTIVES or part == "none":
                return True
    return False


class Fetcher:
    """Downloads one source at a time; safe to share between the threads of one shard task."""

    def __init__(self, opts: FetchOptions):
        self.opts = opts
        self._pool = None

    @property
    def pool(self):
        """urllib3 directly: about 3x less CPU per small GET than requests (measured 0.16 vs 0.47 ms)."""
        if self._pool is None:
            import urllib3

            self._pool = urllib3.PoolManager(num_pools=32, maxsize=self.opts.pool_size, block=False,
                                             headers={"User-Agent": self.opts.user_agent})
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
            self._pool = None

    # ------------------------------------------------------------------------------------------
    def fetch(self, url: str) -> Fetched:
        """Return the bytes behind ``url`` or raise :class:`SampleError` with the failure reason."""
        if not url:
            raise SampleError(INVALID_INPUT, "empty source")
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            got = self._http(url)
        elif scheme == "s3":
            got = Fetched(self._s3(url), 1, url)
        elif scheme == "file":
            got = Fetched(self._local(unquote(urlparse(url).path)), 1, url)
        elif scheme and len(scheme) > 1:  # "c:" style drive letters are not schemes
            raise SampleError(INVALID_INPUT, f"unsupported URL scheme {scheme!r}")
        else:
            got = Fetched(self._local(url), 1, url)
        err = non_media_reason(got.data, None, url)
        if err is not None:
            err.attempts = got.attempts  # type: ignore[attr-defined]
            raise err
        return got

    def local_path(self, url: str) -> str | None:
        """The local file behind ``url`` when it needs no download (videos are decoded in place)."""
        scheme = urlparse(url).scheme.lower()
        if scheme == "file":
            return unquote(urlparse(url).path)
        if not scheme or len(scheme) == 1:
            return url
        return None

    def _local(self, path: str) -> bytes:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise SampleError(NOT_FOUND, f"no such file: {path}") from None
        except OSError as exc:
            raise SampleError(DOWNLOAD_ERROR, f"{type(exc).__name__}: {exc}") from None
        if os.path.isdir(path):
            raise SampleError(INVALID_INPUT, f"{path} is a directory")
        if size > self.opts.max_bytes:
            raise SampleError(TOO_LARGE, f"{size} bytes > max_bytes {self.opts.max_bytes}")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise SampleError(DOWNLOAD_ERROR, f"{type(exc).__name__}: {exc}") from None

    def _s3(self, url: str) -> bytes:
        fs, path = storage.get_fs(url)
        try:
            size = storage.retry_io(lambda: fs.size(path), attempts=self.opts.retries + 1)
            if size is not None and size > self.opts.max_bytes:
                raise SampleError(TOO_LARGE, f"{size} bytes > max_bytes {self.opts.max_bytes}")
            return storage.retry_io(lambda: fs.cat_file(path), attempts=self.opts.retries + 1)
        except FileNotFoundError:
            raise SampleError(NOT_FOUND, f"no such object: {url}") from None
        except SampleError:
            raise
        except Exception as exc:  # s3fs/botocore error types vary by version
            raise SampleError(DOWNLOAD_ERROR, f"{type(exc).__name__}: {exc}") from None

    def _http(self, url: str) -> Fetched:
        import urllib3.exceptions as ue

        opts = self.opts
        last: SampleError | None = None
        attempt = 0
        for attempt in range(1, opts.retries + 2):
            try:
                return Fetched(self._http_once(url), attempt, url)
            except SampleError as exc:
                last = exc
                if not getattr(exc, "retryable", False):
                    break
            except ue.MaxRetryError as exc:  # connection refused / DNS / too many redirects
                inner = exc.reason
                # NewConnectionError subclasses ConnectTimeoutError in urllib3: a refused connection
                # is a download error, not a timeout.
                timed_out = isinstance(inner, ue.TimeoutError) and not isinstance(inner, ue.NewConnectionError)
                reason = TIMEOUT if timed_out else DOWNLOAD_ERROR
                last = SampleError(reason, f"{type(inner or exc).__name__}: {_short(inner or exc)}")
                if isinstance(inner, ue.ResponseError):  # redirect loop: retrying will not help
                    break
            except ue.TimeoutError as exc:
                last = SampleError(TIMEOUT, f"{type(exc).__name__}: {_short(exc)}")
            except (ue.HTTPError, OSError) as exc:  # protocol errors, resets mid-body
                last = SampleError(DOWNLOAD_ERROR, f"{type(exc).__name__}: {_short(exc)}")
            if attempt <= opts.retries:
                time.sleep(opts.backoff_s * (2 ** (attempt - 1)) * (1 + random.random() * 0.25))
        assert last is not None
        last.attempts = attempt  # type: ignore[attr-defined]
        raise last

    def _http_once(self, url: str) -> bytes:
        import urllib3

        opts = self.opts
        deadline = time.monotonic() + opts.timeout_s
        complete = body_started = False
        retries = urllib3.Retry(total=10, connect=0, read=0, status=0, other=0, redirect=5, raise_on_status=False)
        resp = self.pool.request("GET", url, preload_content=False, retries=retries,
                                 timeout=urllib3.Timeout(connect=opts.timeout_s, read=opts.timeout_s))
        try:
            code = resp.status
            if code in (404, 410):
                raise SampleError(NOT_FOUND, f"HTTP {code}")
            if not 200 <= code < 300:
                err = SampleError(DOWNLOAD_ERROR, f"HTTP {code}")
                err.retryable = code == 429 or code >= 500  # type: ignore[attr-defined]
                raise err
            if opts.honor_robots and robots_opt_out(resp.headers.getlist("X-Robots-Tag")):
                raise SampleError(OPTED_OUT, "X-Robots-Tag forbids use")
            ctype_err = non_media_reason(b"", resp.headers.get("Content-Type"), url)
            if ctype_err is not None:
                raise ctype_err
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > opts.max_bytes:
                raise SampleError(TOO_LARGE, f"Content-Length {length} > max_bytes {opts.max_bytes}")
            buf, body_started = bytearray(), True
            for chunk in resp.stream(_CHUNK):
                buf += chunk
                if len(buf) > opts.max_bytes:
                    raise SampleError(TOO_LARGE, f"body over max_bytes {opts.max_bytes}")
                if time.monotonic() > deadline:
                    raise SampleError(TIMEOUT, f"download exceeded {opts.timeout_s}s")
            complete = True
            return bytes(buf)
        finally:
            _hand_back(resp, complete, body_started)


_DRAIN_MAX = 64 << 10  # unread bodies up to this size are read off so the connection can be kept


def _hand_back(resp, complete: bool, body_started: bool) -> None:
    """Return the connection to the pool only when no byte of this response is left unread on it.

    A body left unread (an opt-out, a declared length over the cap, an error page) would otherwise be read as the
    next response on that keep-alive connection: a spurious protocol error, a retry, and a duplicate request to the
    server. A small body refused on its headers is drained so the connection stays warm; a body cut off while
    streaming (cap, timeout, broken transfer) or a large one closes the connection.
    """
    if not complete:
        length = resp.headers.get("Content-Length")
        if not body_started and length and length.isdigit() and int(length) <= _DRAIN_MAX:
            resp.drain_conn()
        else:
            resp.close()
    resp.release_conn()


def _short(exc: BaseException, n: int = 200) -> str:
    s = str(exc)
    return s if len(s) <= n else s[:n] + "..."
