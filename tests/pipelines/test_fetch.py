"""Fetching: status checks, retries with backoff, size caps, opt-outs, s3:// and local sources."""

from __future__ import annotations

import time

import pytest

from pipelines.errors import SampleError
from pipelines.fetch import Fetcher, FetchOptions, resolve_source, robots_opt_out
from tests.pipelines.conftest import make_jpeg

JPEG = make_jpeg(64, 48)


def _reason(fetcher, url):
    with pytest.raises(SampleError) as ei:
        fetcher.fetch(url)
    return ei.value.reason


def test_http_status_handling_and_retries(http_server):
    s = http_server
    s.routes["/ok.jpg"] = (200, {"Content-Type": "image/jpeg"}, JPEG)
    s.routes["/gone"] = (410, {}, b"gone")
    s.routes["/forbidden"] = (403, {}, b"no")
    s.routes["/boom"] = (500, {}, b"err")
    s.routes["/flaky"] = lambda n: (503, {}, b"busy") if n <= 2 else (200, {}, JPEG)
    s.routes["/throttled"] = lambda n: (429, {"Retry-After": "0"}, b"") if n == 1 else (200, {}, JPEG)
    f = Fetcher(FetchOptions(retries=2, backoff_s=0.01))
    got = f.fetch(s.url("/ok.jpg"))
    assert (got.data, got.attempts) == (JPEG, 1)
    assert _reason(f, s.url("/missing.jpg")) == "not_found"  # a 404 HTML page never becomes a sample
    assert _reason(f, s.url("/gone")) == "not_found"
    assert _reason(f, s.url("/forbidden")) == "download_error"
    assert s.hits["/forbidden"] == 1  # 403 is not retried
    assert _reason(f, s.url("/boom")) == "download_error"
    assert s.hits["/boom"] == 3  # 1 + 2 retries
    got = f.fetch(s.url("/flaky"))
    assert got.data == JPEG and got.attempts == 3
    assert f.fetch(s.url("/throttled")).attempts == 2
    assert _reason(f, "http://127.0.0.1:9/nothing-listens-here") == "download_error"
    f.close()


def test_size_cap_is_enforced_while_streaming(http_server):
    s = http_server
    big = b"x" * 50_000
    s.routes["/declared"] = (200, {}, big)
    s.routes["/undeclared"] = (200, {"Content-Length": None}, big)  # no length header: cap while reading
    f = Fetcher(FetchOptions(max_bytes=10_000))
    assert _reason(f, s.url("/declared")) == "too_large"
    assert _reason(f, s.url("/undeclared")) == "too_large"
    s.routes["/nolength"] = (200, {"Content-Length": "1"}, big[:1])  # honest small body passes
    assert f.fetch(s.url("/nolength")).data == b"x"


def test_x_robots_tag_opt_out(http_server):
    s = http_server
    s.routes["/noai"] = (200, {"X-Robots-Tag": "noai, noimageai"}, JPEG)
    s.routes["/google-only"] = (200, {"X-Robots-Tag": "googlebot: noindex"}, JPEG)
    s.routes["/all"] = (200, {"X-Robots-Tag": ["nofollow", "*: noindex"]}, JPEG)
    f = Fetcher(FetchOptions())
    assert _reason(f, s.url("/noai")) == "opted_out"
    assert f.fetch(s.url("/google-only")).data == JPEG
    assert _reason(f, s.url("/all")) == "opted_out"
    assert Fetcher(FetchOptions(honor_robots=False)).fetch(s.url("/noai")).data == JPEG
    assert robots_opt_out(["mplug2-ray: none"]) and not robots_opt_out(["otherbot: noai", "nosnippet"])


def test_a_refused_body_is_never_read_as_the_next_response(http_server):
    """Opt-outs, declared sizes over the cap, non-media types and error pages are refused on their headers. Their
    unread bodies must not stay on the keep-alive connection: the next download from that host would read them as
    its response, fail, retry and ask the server twice (seen as a flaky ``attempts`` count in the shard sidecars)."""
    s = http_server
    s.routes["/ok.jpg"] = (200, {"Content-Type": "image/jpeg"}, JPEG)
    refused = {"/noai": ((200, {"X-Robots-Tag": "noai"}, JPEG), "opted_out"),
               "/declared-big": ((200, {}, b"\xff\xd8" + b"\0" * 30_000), "too_large"),
               "/page": ((200, {"Content-Type": "text/html"}, b"<html>" + b"x" * 5_000), "not_media"),
               "/forbidden": ((403, {}, b"<html>no</html>" * 200), "download_error"),
               "/streamed-big": ((200, {"Content-Length": None}, b"\xff\xd8" + b"\0" * 30_000), "too_large")}
    f = Fetcher(FetchOptions(retries=2, backoff_s=0.01, max_bytes=20_000, pool_size=1))
    for n, (path, (route, reason)) in enumerate(refused.items(), 1):
        s.routes[path] = route
        assert _reason(f, s.url(path)) == reason
        got = f.fetch(s.url("/ok.jpg"))
        assert (got.data, got.attempts) == (JPEG, 1), path
        assert (s.hits[path], s.hits["/ok.jpg"]) == (1, n), path  # nothing asked twice
    f.close()


def test_stalled_server_times_out():
    f = Fetcher(FetchOptions(timeout_s=0.5, retries=0))
    # A server that accepts the connection but never answers: read timeout.
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    t0 = time.monotonic()
    try:
        assert _reason(f, f"http://127.0.0.1:{port}/stall") == "timeout"
    finally:
        sock.close()
    assert time.monotonic() - t0 < 5


def test_local_file_and_s3_sources(tmp_path, s3_bucket):
    from mplug2 import storage

    p = tmp_path / "a.jpg"
    p.write_bytes(JPEG)
    f = Fetcher(FetchOptions(max_bytes=len(JPEG)))
    assert f.fetch(str(p)).data == JPEG
    assert f.fetch(p.as_uri()).data == JPEG
    assert _reason(f, str(tmp_path / "nope.jpg")) == "not_found"
    assert _reason(f, "ftp://host/x.jpg") == "invalid_input"
    storage.atomic_write(f"{s3_bucket}/media/a.jpg", JPEG)
    assert f.fetch(f"{s3_bucket}/media/a.jpg").data == JPEG
    assert _reason(f, f"{s3_bucket}/media/missing.jpg") == "not_found"
    storage.atomic_write(f"{s3_bucket}/media/big.jpg", JPEG + b"\0")
    assert _reason(f, f"{s3_bucket}/media/big.jpg") == "too_large"
    assert resolve_source("imgs/a.jpg", None, "s3://b/m/manifest.csv") == "s3://b/m/imgs/a.jpg"
    assert resolve_source("a.jpg", "/data", "/x/m.csv") == "/data/a.jpg"
