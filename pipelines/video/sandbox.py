"""Untrusted media decodes in a pool of pre-started, killable worker processes (``python -c`` children in
their own session). The caller waits at most its deadline; a worker past it is killed with its process group
(ffmpeg children included) and replaced, and the item fails as ``timeout``; a crashed decoder fails it as
``decode_error`` instead of taking the caller down."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipelines.errors import DECODE_ERROR, TIMEOUT, SampleError

log = logging.getLogger(__name__)


class _Worker:
    """One pre-started decoder process speaking pickled messages over two pipes."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        root = str(Path(__file__).resolve().parents[2])
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from pipelines.video.sandbox import worker_main; "
                "worker_main(int(sys.argv[2]), int(sys.argv[3]))")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", code, root, str(req_r), str(resp_w)],
                                     pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL,
                                     stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,
                                     start_new_session=True, env=env, close_fds=True)
        os.close(req_r)
        os.close(resp_w)
        self.send_conn = Connection(req_w, readable=False)
        self.recv_conn = Connection(resp_r, writable=False)

    def call(self, req: tuple, timeout_s: float) -> tuple:
        self.send_conn.send(req)
        if not self.recv_conn.poll(timeout_s):
            raise TimeoutError
        return self.recv_conn.recv()

    def kill(self) -> None:
        """SIGKILL the worker and any ffmpeg it started. Only while it is unreaped: once reaped, its pid (the
        group's id) is free for the kernel to give to another process, which a stale killpg would kill."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.kill()      # the worker itself, should the group be out of reach (not yet reaped: safe)
            self.proc.wait()
        self.send_conn.close()
        self.recv_conn.close()

    def close(self) -> None:
        try:
            self.send_conn.close()  # EOF: the worker exits its loop
            self.proc.wait(timeout=2)
        except (subprocess.TimeoutExpired, OSError):
            pass
        self.kill()


def _has_fileno(f: Any) -> bool:
    try:
        f.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


class _WorkerPool:
    """Idle workers reused across calls; a worker that timed out or died is discarded, never reused."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self.started = 0

    def call(self, req: tuple, timeout_s: float, what: str) -> Any:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker()
            self.started += 1
        try:
            reply = worker.call(req, timeout_s)
        except TimeoutError:
            worker.kill()
            log.warning("%s: decode past its %.1fs deadline, worker killed", what, timeout_s)
            raise SampleError(TIMEOUT, f"decode exceeded {timeout_s:.1f}s") from None
        except (EOFError, OSError) as e:
            worker.kill()
            rc = worker.proc.returncode
            log.warning("%s: decoder process died (exit %s)", what, rc)
            raise SampleError(DECODE_ERROR, f"decoder process died (exit {rc}): {type(e).__name__}") from None
        except BaseException:
            worker.kill()
            raise
        with self._lock:
            self._idle.append(worker)
        if reply[0] == "ok":
            return reply[1]
        _, reason, message = reply
        raise SampleError(reason, message)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()


POOL = _WorkerPool()
atexit.register(POOL.close)


def worker_main(req_fd: int, resp_fd: int) -> None:
    """Worker loop: one request at a time until the parent closes the pipe."""
    from pipelines.video.extract import handle

    recv = Connection(req_fd, writable=False)
    send = Connection(resp_fd, readable=False)
    os.dup2(2, 1)  # stray prints must not corrupt anything
    while True:
        try:
            req = recv.recv()
        except (EOFError, OSError):
            return
        send.send(handle(req))

