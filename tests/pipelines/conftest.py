"""Fixtures for the corpus-pipeline tests: real JPEG files and a loopback HTTP server with scripted answers."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image


def import_wids():
    """webdataset's ``wids``, imported without leaving ``/tmp/_wids_cache`` behind: importing it creates that folder
    (a default argument evaluated at import, ``LRUShards(localname=DefaultLocalname())``), though every reader here
    is given a ``cache_dir`` of its own."""
    default_cache = Path("/tmp/_wids_cache")
    existed = default_cache.exists()
    import wids

    if not existed:
        try:
            default_cache.rmdir()
        except OSError:      # no longer empty: something else uses it now
            pass
    return wids


def wids_dataset(index: str, cache_dir: str):
    """``wids.ShardListDataset`` over a ``wids-index.json``, images decoded with PIL as wids' default does, but
    given as the function itself (the default's string form, ``"PIL"``, warns that it is deprecated)."""
    from functools import partial

    wids = import_wids()
    return wids.ShardListDataset(index, cache_dir=cache_dir,
                                 transformations=partial(wids.wids.default_decoder, format="PIL"))


def make_jpeg(w: int, h: int, seed: int = 0, quality: int = 90, exif_orientation: int | None = None) -> bytes:
    """A noisy-but-smooth real JPEG (random low-res pattern upscaled), like a photo for the codec."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((max(1, h // 8), max(1, w // 8), 3)) * 255).astype("uint8")
    img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:04d}.jpg"
        p.write_bytes(make_jpeg(int(rng.integers(320, 800)), int(rng.integers(240, 600)), seed=seed * 1000 + i))
        paths.append(p)
    return paths


Route = tuple[int, dict, bytes] | Callable[[int], tuple[int, dict, bytes]]


class ScriptedServer:
    """``ThreadingHTTPServer`` on 127.0.0.1: each path answers a fixed (status, headers, body) or a function
    of the hit count (to script "503 twice, then 200"). ``hits`` counts requests per path."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.hits: Counter = Counter()
        self.delay_s = 0.0  # added to every answer (slow-network runs)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):
                outer.hits[self.path] += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                route = outer.routes.get(self.path, (404, {"Content-Type": "text/html"}, b"<html>404 Not Found</html>"))
                status, headers, body = route(outer.hits[self.path]) if callable(route) else route
                self.send_response(status)
                for k, v in headers.items():
                    for vv in (v if isinstance(v, list) else [v]):
                        if vv is not None:
                            self.send_header(k, vv)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                elif headers["Content-Length"] is None:  # undeclared length: body ends at close
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients cut bodies short on purpose
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    srv = ScriptedServer().start()
    yield srv
    srv.stop()
