"""The commit protocol: payload files, then every rank's ``done`` marker, then ``manifest.json`` last.

A checkpoint counts only if the manifest exists and all ``world_size`` markers list files that exist with
their recorded sizes (:func:`checkpoint_problems`); storage that stays down past its retry deadline raises
instead of calling a checkpoint invalid (never a silent fall-back to an older one). :func:`upload_checkpoint`
copies a finished local folder in that order, each file retried through an S3 restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable

from mplug2 import storage
from mplug2.train.checkpoint.layout import (
    FORMAT_VERSION, MANIFEST_FILE, CheckpointError, code_version, config_hash, done_file, read_json,
)

log = logging.getLogger("mplug2.train.checkpoint")


def commit_checkpoint(directory: str, *, step: int, world_size: int, config_fingerprint: Any,
                      wait_for_ranks_s: float = 600.0, poll_s: float = 0.5) -> None:
    """Rank 0: wait for every rank's marker (when ``wait_for_ranks_s`` > 0), then write ``manifest.json``."""
    if wait_for_ranks_s > 0:
        deadline = time.monotonic() + wait_for_ranks_s
        missing = list(range(world_size))
        while True:
            missing = [r for r in missing if not storage.exists(storage.join(directory, done_file(r)))]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"{directory}: ranks {missing} wrote no done marker within "
                                      f"{wait_for_ranks_s:.0f}s; manifest not written")
            time.sleep(poll_s)
    manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
                "config_hash": config_hash(config_fingerprint), "code": code_version(), "time": time.time()}
    storage.atomic_write(storage.join(directory, MANIFEST_FILE), json.dumps(manifest, sort_keys=True, indent=1).encode())


def _upload_rank(name: str) -> int:
    """Upload order inside one checkpoint folder: payload (0), then ``done`` markers (1), ``manifest.json`` (2)."""
    if name == MANIFEST_FILE:
        return 2
    return 1 if name.startswith("done_rank") else 0


def write_local_atomically(path: str, to_file: Callable[[str], object], durable: bool = True,
                           make_parents: bool = True) -> None:
    """Make a local file appear whole or not at all: ``to_file(tmp)`` writes it beside ``path``, fsync when
    ``durable`` (survives a crash; a staging copy that is uploaded and deleted needs none), ``os.replace``.
    ``make_parents=False`` fails when the folder is gone instead of creating it again."""
    if make_parents:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.partial.{os.getpid()}"
    try:
        to_file(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` holds ``src``'s bytes: a hard link on the same file system (nothing copied: the staged checkpoint
    files are written once, then only deleted), else a kernel-side copy (sendfile / copy_file_range)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def upload_checkpoint(local_dir: str, dest: str) -> list[str]:
    """Copy a finished local checkpoint folder (or one rank's part of it) to ``dest``, commit markers last.

    A stale ``manifest.json`` at ``dest`` (an earlier attempt at the same step) is deleted first, then the
    payload files go up, then the ``done`` markers, then the manifest: a reader never sees a manifest over
    files that are still changing. Each file is one PUT (visible only when complete) retried through
    :func:`mplug2.storage.retry_io` until ``$MPLUG2_S3_RETRY_DEADLINE_S``, so an S3 restart mid-upload costs
    time, not the checkpoint; past the deadline :class:`mplug2.storage.StorageUnavailableError` is raised and
    the folder stays invalid (no manifest) until a later attempt completes it. A local ``dest`` gets each file
    fsynced, then renamed into place; on the same file system as ``local_dir`` it is a hard link, so the local
    files must not be written again (they are deleted after the upload). Returns the names uploaded.
    """
    t0 = time.perf_counter()
    names = sorted((n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n))),
                   key=lambda n: (_upload_rank(n), n))
    if MANIFEST_FILE in names:
        storage.remove(storage.join(dest, MANIFEST_FILE))
    total = 0
    for name in names:
        local = os.path.join(local_dir, name)
        total += os.path.getsize(local)
        url = storage.join(dest, name)
        if storage.is_remote(dest):
            storage.upload_file(local, url)
        else:
            write_local_atomically(storage.get_fs(url)[1], lambda tmp, src=local: _link_or_copy(src, tmp))
    log.info("uploaded checkpoint %s: %d files, %.1f MiB in %.2fs", dest, len(names), total / 2**20,
             time.perf_counter() - t0)
    return names


def checkpoint_problems(directory: str) -> tuple[list[str], dict[str, Any] | None]:
    """What makes ``directory`` unusable (empty list = valid), and its manifest if readable."""
    murl = storage.join(directory, MANIFEST_FILE)
    try:
        manifest = read_json(murl)
    except FileNotFoundError:
        return ["no manifest.json (interrupted before commit)"], None
    except storage.StorageUnavailableError:
        raise    # storage is down: "invalid" would silently fall back to an older checkpoint
    except (OSError, ValueError) as exc:
        return [f"unreadable manifest.json ({exc!r})"], None
    if manifest.get("format_version") != FORMAT_VERSION:
        return [f"manifest format_version {manifest.get('format_version')!r} != {FORMAT_VERSION}"], manifest
    problems = []
    for r in range(int(manifest["world_size"])):
        try:
            marker = read_json(storage.join(directory, done_file(r)))
        except FileNotFoundError:
            problems.append(f"rank {r} marker {done_file(r)} missing")
            continue
        except storage.StorageUnavailableError:
            raise
        except (OSError, ValueError) as exc:
            problems.append(f"rank {r} marker unreadable ({exc!r})")
            continue
        if marker.get("step") != manifest["step"]:
            problems.append(f"rank {r} marker is for step {marker.get('step')}, manifest for {manifest['step']}")
        for name, size in marker.get("files", {}).items():
            try:
                actual = storage.size(storage.join(directory, name))
            except FileNotFoundError:
                problems.append(f"{name} (rank {r}) missing")
                continue
            if actual != size:
                problems.append(f"{name} (rank {r}) has {actual} bytes, marker says {size}")
    return problems, manifest


def validate_checkpoint(directory: str) -> bool:
    """True iff the manifest exists and all ``world_size`` markers match the files present."""
    problems, _ = checkpoint_problems(directory)
    if problems:
        log.warning("checkpoint %s is invalid: %s", directory, "; ".join(problems))
    return not problems
