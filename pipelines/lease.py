"""The writer lease: one run writes a dataset prefix at a time (``_writer.lock`` with an owner id).

Its own module because it is a protocol of its own beside the shard files: the driver takes and renews it,
and every shard task checks it right before committing (:mod:`pipelines.shards` owns the files it guards).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from pipelines.errors import PermanentShardError
from pipelines.shards import LOCK_NAME, Output, canonical_json

log = logging.getLogger(__name__)


DEFAULT_TTL_S = 120.0  # a lease whose heartbeat is older is stale


class LeaseError(PermanentShardError):
    """Another live run holds the writer lease on this dataset (retrying a shard cannot win it back)."""


class WriterLease:
    """One writer per dataset prefix at a time: a lease object ``_writer.lock`` with an owner id.

    Why a run-level lease rather than per-shard locks: S3 has no portable compare-and-swap (conditional
    PUT support varies across S3-compatible stores), and a per-shard lock would cost two extra requests
    per shard. The lease is written, then read back after a settle delay (the last writer wins, the
    others see a foreign owner and stop); the driver renews it while it runs; every shard task checks
    the owner right before committing, so a run that lost its lease never commits a shard. A lease is
    stale when its heartbeat is older than ``ttl_s``, or when its owner process on this host is dead
    (a SIGKILLed local run), so a killed run never blocks the next one for long.
    """

    def __init__(self, out: Output, ttl_s: float = DEFAULT_TTL_S, settle_s: float = 1.0):
        self.out, self.ttl_s, self.settle_s = out, ttl_s, settle_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._last_renew = 0.0
        self.settles_at = 0.0  # wall-clock time at which the lease written by acquire() has settled

    def _record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                "heartbeat": time.time(), "ttl_s": self.ttl_s}

    @staticmethod
    def is_stale(rec: dict, ttl_s: float) -> bool:
        if time.time() - float(rec.get("heartbeat", 0)) > float(rec.get("ttl_s", ttl_s)):
            return True
        # A pid means something only in its own pid namespace (containers sharing the host's network,
        # and so its host name, have their own): elsewhere only the heartbeat tells.
        if rec.get("host") == socket.gethostname() and rec.get("pidns", _pid_namespace()) == _pid_namespace():
            try:
                os.kill(int(rec.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                return False
        return False

    def acquire(self, force: bool = False, settle: bool = True) -> None:
        """Write the lease; with ``settle=False`` the caller must :meth:`confirm` before writing shards
        (the driver starts Ray in between, so the settle delay costs no wall time)."""
        cur = self.out.read_json(LOCK_NAME)
        if cur and not force and not self.is_stale(cur, self.ttl_s):
            raise LeaseError(f"{self.out.url} is being written by {cur.get('owner')} (heartbeat "
                             f"{time.time() - float(cur.get('heartbeat', 0)):.0f}s ago); wait for it, or pass "
                             "--force-unlock if that run is gone")
        if cur:
            log.warning("taking over %s lease from %s", "a live" if force else "a stale", cur.get("owner"))
        self.out.write_bytes(LOCK_NAME, canonical_json(self._record()))
        self._last_renew = time.monotonic()
        self.settles_at = time.time() + self.settle_s
        if settle:
            self.confirm()

    def confirm(self) -> None:
        """Wait out the settle delay since the lease was written, then check we still own it."""
        time.sleep(max(0.0, self.settle_s - (time.monotonic() - self._last_renew)))
        self.check()

    def check(self) -> None:
        cur = self.out.read_json(LOCK_NAME)
        if not cur or cur.get("owner") != self.owner:
            raise LeaseError(f"lost the writer lease on {self.out.url} to {cur and cur.get('owner')}")

    def renew(self, every_s: float | None = None) -> None:
        every_s = self.ttl_s / 4 if every_s is None else every_s
        if time.monotonic() - self._last_renew >= every_s:
            self.check()
            self.out.write_bytes(LOCK_NAME, canonical_json(self._record()))
            self._last_renew = time.monotonic()

    def release(self) -> None:
        try:
            cur = self.out.read_json(LOCK_NAME)
            if cur and cur.get("owner") == self.owner:
                self.out.delete(LOCK_NAME)
        except Exception as exc:  # the run's result matters more than lease cleanup
            log.warning("could not release lease: %s", exc)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: one namespace
        return ""


def lease_owner_ok(out_url: str, owner: str) -> bool:
    """Shard-task side of the lease: is ``owner`` still the dataset's writer, and alive?

    Alive matters because a shard task can outlive its driver: Ray workers run in process groups of
    their own, so a driver SIGKILLed with its group leaves its running tasks going until they notice
    their raylet is gone (about a second). The lease then still names the dead driver; without the
    liveness check such a task committed a shard after the kill, behind the back of the run that resumes.
    """
    rec = Output(out_url).read_json(LOCK_NAME)
    return bool(rec) and rec.get("owner") == owner and not WriterLease.is_stale(rec, DEFAULT_TTL_S)
