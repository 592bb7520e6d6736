"""How the training loop talks to its orchestrator: report a step (with a checkpoint snapshot to write and
upload in the background), wait for that upload, say where to resume from.

:class:`RayHooks` binds it to Ray Train (its ASYNC upload mode runs :func:`write_and_upload`);
:class:`LocalHooks` to plain processes and ``torchrun`` (a :class:`~mplug2.train.uploader.BackgroundUploader`
thread). Either way the snapshot's files are serialised by the run's writer process
(:class:`~mplug2.train.checkpoint.writer.SnapshotWriter`), then uploaded with markers and manifest last.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Callable, Protocol

import torch.distributed as dist

from mplug2 import storage
from mplug2.train.checkpoint import STEP_PREFIX, Snapshot, prune_checkpoints, upload_checkpoint
from mplug2.train.config import TrainConfig
from mplug2.train.uploader import BackgroundUploader

log = logging.getLogger("mplug2.train")

__all__ = ["Hooks", "LocalHooks", "RayHooks", "write_and_upload"]


class Hooks(Protocol):
    def report(self, metrics: dict[str, float], checkpoint: Snapshot | None, step: int) -> None:
        """Report a step; a ``checkpoint`` is written into its local folder (:func:`write_and_upload`),
        uploaded and then deleted in the background."""
    def wait_for_upload(self, block: bool = True) -> None:
        """Block until the checkpoint in flight (if any) is written and uploaded; raise its error
        (``block=False``: raise the error of one that already failed, do not wait)."""
    def upload_in_flight(self) -> bool:
        """True while a checkpoint is being written or uploaded (never blocks)."""
    def close(self) -> None:
        """After the run's last wait: finish what the uploads left (retention)."""
    def resume_from(self) -> str | None: ...


def write_and_upload(checkpoint: Snapshot, upload: Callable[[str], object]) -> object:
    """The background half of a checkpoint: write the snapshot's files into its local folder, then
    ``upload(local_folder)``; the seconds both took land in ``checkpoint.background_s``."""
    t0 = time.perf_counter()
    checkpoint.write()
    out = upload(checkpoint.directory)
    checkpoint.background_s = time.perf_counter() - t0
    log.info("checkpoint step %d (rank %d) off the critical path: snapshot %.3fs on the step, write + upload "
             "%.2fs in the background", checkpoint.step, checkpoint.rank, checkpoint.taken_s, checkpoint.background_s)
    return out


class RayHooks:
    """Report to Ray Train (every rank, same steps: ``report`` is a barrier) and resume from its checkpoint."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._upload_done: threading.Event | None = None
        self._upload_error: BaseException | None = None

    def report(self, metrics: dict[str, float], checkpoint: Snapshot | None, step: int) -> None:
        """A checkpoint goes up in Ray's ASYNC mode: Ray runs :meth:`_upload` in its upload thread (which first
        writes the snapshot into its folder), registers the checkpoint after it (in report order), deletes
        the local folder, raises an upload error in this worker, and waits for the last upload when the
        training function returns. The event below adds the depth-1 queue (:meth:`wait_for_upload`)."""
        import ray.train
        from ray.train import CheckpointUploadMode

        if checkpoint is None:
            ray.train.report(metrics)
            return
        done = self._upload_done = threading.Event()

        def upload(ray_checkpoint, dir_name: str):
            try:
                return write_and_upload(checkpoint, lambda local: self._upload(local, dir_name))
            except BaseException as exc:
                self._upload_error = exc
                raise
            finally:
                done.set()

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint.directory),
                         checkpoint_dir_name=f"{STEP_PREFIX}{step:08d}", checkpoint_upload_fn=upload,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)

    def close(self) -> None:
        """Nothing left: Ray registers the uploads and applies its own ``num_to_keep``."""

    def upload_in_flight(self) -> bool:
        return self._upload_done is not None and not self._upload_done.is_set()

    def wait_for_upload(self, block: bool = True) -> None:
        if self._upload_done is not None and (block or self._upload_done.is_set()):
            self._upload_done.wait()
            self._upload_done = None
        if self._upload_error is not None:
            error, self._upload_error = self._upload_error, None
            raise error

    def _upload(self, local: str, dir_name: str):
        """Ray's own upload (pyarrow ``copy_files``) has no retries (ray#55350) and no order; ours retries each
        file until the storage deadline (an S3 restart) and puts markers and the manifest last."""
        import ray.train

        dest = storage.join(self.cfg.storage, self.cfg.run_name, dir_name)
        upload_checkpoint(local, dest)
        fs, path = storage.pyarrow_fs(dest)     # the same place Ray's own upload would have used
        return ray.train.Checkpoint(path=path, filesystem=fs)

    def resume_from(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return f"s3://{ckpt.path}" if storage.is_remote(self.cfg.storage) else ckpt.path


class LocalHooks:
    """No orchestrator: copy each rank's checkpoint part to ``<run>/step_N/`` and keep the newest ``keep_last``.

    Used by single-process runs and ``torchrun`` (``bench/bench_train.py``) to measure Ray's overhead;
    resume comes from the storage scan in :meth:`TrainLoop.restore`.
    """

    def __init__(self, cfg: TrainConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.run_dir = storage.join(cfg.storage, cfg.run_name)
        self.uploader = BackgroundUploader()
        self._uploaded = False
        self._prune_due = False           # every rank's previous upload ended: rank 0 may prune

    def report(self, metrics: dict[str, float], checkpoint: Snapshot | None, step: int) -> None:
        if checkpoint is None:
            return
        dest = storage.join(self.run_dir, f"{STEP_PREFIX}{step:08d}")
        prune, self._prune_due = self._prune_due, False

        def upload() -> None:             # markers and manifest last; retried through an S3 restart
            try:
                if prune:                 # off the step too; never this step's folder, which other ranks fill
                    prune_checkpoints(self.run_dir, self.cfg.schedule.keep_last, below_step=step)
                write_and_upload(checkpoint, lambda local: upload_checkpoint(local, dest))
            finally:
                shutil.rmtree(checkpoint.directory, ignore_errors=True)

        self.uploader.submit(upload, f"{STEP_PREFIX}{step:08d}")
        self._uploaded = True

    def wait_for_upload(self, block: bool = True) -> None:
        """This rank's upload ended; then every rank's (a barrier), so rank 0 may prune old checkpoints: in
        the next checkpoint's background job, or in :meth:`close` after the last one."""
        self.uploader.wait(block)
        if not block or not self._uploaded:
            return
        self._uploaded = False
        if dist.is_initialized():
            dist.barrier()
        self._prune_due = self.rank == 0

    def upload_in_flight(self) -> bool:
        return self.uploader.busy

    def close(self) -> None:
        """Keep the newest ``keep_last`` checkpoints (rank 0, once every upload ended)."""
        self.uploader.close()
        if self._prune_due:
            self._prune_due = False
            prune_checkpoints(self.run_dir, self.cfg.schedule.keep_last)

    def resume_from(self) -> str | None:
        return None
