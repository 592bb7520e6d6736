"""Ray Train wiring: one ``TorchTrainer`` per run, resumable by name.

Ray appears only here and in :mod:`mplug2.train.loop`'s thin reporting calls. Resume semantics (Ray Train V2):
re-running with the same ``RunConfig(name, storage_path)`` restores the newest reported checkpoint
(``checkpoint_manager_snapshot.json``); a lost worker restarts the worker group from that checkpoint,
up to ``scale.max_failures`` times.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from mplug2 import storage
from mplug2.train.config import TrainConfig

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"
SCRATCH_ENV = "MPLUG2_SCRATCH_DIR"   # the run's temporary folder on each node (worker_scratch)


def run_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage, cfg.run_name)


def has_previous_run(cfg: TrainConfig) -> bool:
    return storage.exists(storage.join(run_dir(cfg), SNAPSHOT))


def build_trainer(cfg: TrainConfig, scratch: str | None = None):
    """A ``TorchTrainer`` for ``cfg`` (nothing starts until ``.fit()``). Workers keep their temporary files
    (local checkpoint parts, log copies) under ``scratch`` (``MPLUG2_SCRATCH_DIR``), which :func:`fit` removes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mplug2.runtime import forwarded_env
    from mplug2.train.rendezvous import BoundTorchConfig

    fs, path = storage.pyarrow_fs(cfg.storage)
    if not storage.is_remote(cfg.storage):
        os.makedirs(path, exist_ok=True)
    backend = cfg.scale.backend or ("nccl" if cfg.scale.use_gpu else "gloo")
    resources = {"CPU": cfg.scale.cpus_per_worker}
    if cfg.scale.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_in_scratch,
        train_loop_config=cfg.to_dict(),
        # the process group listens on the node's cluster address (127.0.0.1 locally), not on every interface
        torch_config=BoundTorchConfig(backend=backend, timeout_s=cfg.scale.timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu, resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.schedule.keep_last),
            # no credential values here: Ray logs runtime envs (mplug2.runtime.SECRET_ENV)
            # TMPDIR too: whatever else a worker writes to its temp dir (multiprocessing's pymp-*) goes there
            worker_runtime_env={"env_vars": {**forwarded_env(),
                                             **({SCRATCH_ENV: scratch, "TMPDIR": scratch} if scratch else {})}},
        ),
    )


def train_loop_in_scratch(config: dict) -> None:
    """What Ray Train runs on every worker: :func:`mplug2.train.loop.train_loop_per_worker` inside
    :func:`worker_scratch`."""
    from mplug2.train.loop import train_loop_per_worker

    with worker_scratch():
        train_loop_per_worker(config)


@contextlib.contextmanager
def worker_scratch():
    """This worker's temporary files (checkpoint parts before upload, log copies) go to a folder of its own
    under the run's scratch folder (``MPLUG2_SCRATCH_DIR``; :func:`fit` removes it when the run ends, also after
    a crash on this node), and the worker removes its folder when it ends, normally or with an error."""
    root = os.environ.get(SCRATCH_ENV)
    if not root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    mine = tempfile.mkdtemp(prefix="worker-", dir=root)
    previous, tempfile.tempdir = tempfile.tempdir, mine
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(mine, ignore_errors=True)


def latest_eval(cfg: TrainConfig) -> dict[str, float]:
    """The newest evaluation scores of a run (``<run>/eval/latest.json``), or {} if it never evaluated."""
    import json

    url = storage.join(run_dir(cfg), "eval", "latest.json")
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def recent_train_metrics(cfg: TrainConfig, keys: tuple[str, ...], last: int = 50) -> dict[str, float]:
    """Mean of training metrics over a run's last ``last`` logged steps (``<run>/logs/metrics.jsonl``)."""
    from mplug2.train.metrics import recent_means

    url = storage.join(run_dir(cfg), "logs", "metrics.jsonl")
    return recent_means(storage.read_bytes(url).decode(), keys, last) if storage.exists(url) else {}


def fit(cfg: TrainConfig):
    """Run (or resume) training; returns Ray's ``Result``. ``resume: never`` refuses an existing run."""
    cfg = cfg.resolve_paths()                 # idempotent; workers must not see relative paths
    exists = has_previous_run(cfg)
    if exists and cfg.resume == "never":
        raise FileExistsError(
            f"run {cfg.run_name!r} already exists at {run_dir(cfg)}; choose a new run_name or use resume: auto")
    log.info("%s run %s at %s", "resuming" if exists else "starting", cfg.run_name, run_dir(cfg))
    scratch = tempfile.mkdtemp(prefix=f"mplug2-scratch-{cfg.run_name}-")
    try:
        result = build_trainer(cfg, scratch).fit()
    finally:   # workers on this node are gone by now; success or failure, nothing is left in /tmp
        shutil.rmtree(scratch, ignore_errors=True)
    if result.error is not None:
        raise result.error
    return result
