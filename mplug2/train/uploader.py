"""Checkpoint uploads off the training thread, one at a time (a queue of depth 1).

Training continues while a checkpoint goes up; the next save first waits for the previous upload to end, so
at most one upload is in flight (never two of the same step, never a growing backlog of local folders when
storage is slower than the checkpoint interval), uploads finish in step order, and an upload's error is
raised in the training thread at the next save or at the end of the run (:meth:`wait`), never lost.
The commit protocol is the upload function's business (:func:`mplug2.train.checkpoint.commit.upload_checkpoint`:
payload, markers, manifest last); this module only decides *when* it runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["BackgroundUploader"]


class BackgroundUploader:
    """Run one upload at a time in a daemon thread; :meth:`submit` and :meth:`wait` re-raise its error.

    The thread is started once and then waits for work: starting a thread per upload made the training thread
    wait ~2.5 ms at each checkpoint for the new thread to be scheduled, on a host whose cores the step and the
    loader keep busy (docs/benchmarks.md, issue 13). Daemon, so a process that fails while an upload retries
    through a dead storage exits instead of waiting out the retry deadline."""

    def __init__(self, name: str = "mplug2-ckpt-upload") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], str] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._label = ""

    @property
    def busy(self) -> bool:
        """True while an upload runs."""
        return not self._idle.is_set()

    def submit(self, upload: Callable[[], object], label: str) -> float:
        """Wait for the previous upload (raising its error), then start ``upload`` in the background.
        Returns the seconds spent waiting for the previous one."""
        waited = self.wait()
        self._label = label
        self._idle.clear()
        if self._thread is None or not self._thread.is_alive():     # not alive: closed, or a forked child
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((upload, label))
        return waited

    def close(self) -> None:
        """Wait for the running upload (raising its error), then end the thread."""
        try:
            self.wait()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            upload, label = job
            threading.current_thread().name = f"{self.name}-{label}"
            try:
                upload()
            except BaseException as exc:      # handed to the training thread by wait()
                log.error("background upload of %s failed: %r", label, exc)
                self._error = exc
            finally:
                threading.current_thread().name = self.name
                self._idle.set()

    def wait(self, block: bool = True) -> float:
        """Block until the running upload (if any) ended; raise its error. Returns the seconds waited.
        ``block=False`` only raises the error of an upload that already failed (a check after every step,
        so a dead storage stops the run within its retry deadline, not at the next checkpoint)."""
        t0 = time.perf_counter()
        if block:
            self._idle.wait()
        waited = time.perf_counter() - t0
        if self._error is not None and self._idle.is_set():
            error, self._error = self._error, None
            raise error
        if waited > 0.05:
            log.info("waited %.2fs for the upload of %s", waited, self._label)
        return waited
