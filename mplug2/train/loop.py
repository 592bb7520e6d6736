"""The training loop: one readable function per concern, run by every data-parallel worker.

The loop knows nothing about Ray. It talks to its orchestrator through :class:`~mplug2.train.hooks.Hooks`
(report a step with an optional checkpoint snapshot; say where to resume from). :func:`train_loop_per_worker`
binds them to Ray Train; :func:`run_local` (``bench/bench_train.py``) to plain ``torch.distributed``.

Each optimizer step: k micro-batches (gradient sync only on the last), clip, AdamW, LR schedule, EMA of
the momentum twins. Every ``ckpt_every_steps`` (and at the end) every rank snapshots its part of the
checkpoint into CPU memory (model and optimizer on rank 0; RNG and data cursor on every rank) and reports
it; a writer process writes the files (markers, manifest last) and a background thread uploads them while
training goes on, one checkpoint in flight at most; the logs that changed follow once that upload is done.
A restarted worker restores all of it, so the next step is exactly the one it would have run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mplug2 import storage
from mplug2.data.augment import finish_batch
from mplug2.runtime import setup_process_env
from mplug2.train import build, parallel
from mplug2.train.flops import StepFlops, peak_tflops
from mplug2.train.checkpoint import (
    Snapshot, StagingBuffers, find_latest_valid, list_step_checkpoints, load_checkpoint, take_snapshot,
)
from mplug2.train.checkpoint.writer import SnapshotWriter
from mplug2.train.config import CorpusConfig, TrainConfig
from mplug2.train.evalset import cached_eval_set
from mplug2.train.hooks import Hooks, LocalHooks, RayHooks
from mplug2.train.metrics import MetricsLogger, plot_curves
from mplug2.train.tasks import EvalContext, get_task
from mplug2.train.uploader import BackgroundUploader

log = logging.getLogger("mplug2.train")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch to ``device`` and finish its pixels there when the loader left that to the device
    (``data.augment_on: device``)."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return finish_batch(moved)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepTimes:
    data_wait_s: float = 0.0
    step_time_s: float = 0.0
    flops: float = 0.0            # this device's FLOPs in the step (forward + backward of every micro-batch)


class TrainLoop:
    """State and steps of one worker's training run."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int, device: torch.device, hooks: Hooks):
        setup_process_env()
        self.cfg, self.rank, self.world_size, self.device, self.hooks = cfg, rank, world_size, device, hooks
        self.spec = get_task(cfg.task)
        self.run_dir = storage.join(cfg.storage, cfg.run_name)
        if cfg.debug.deterministic:
            torch.use_deterministic_algorithms(True)
        if "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
            # Ray sets OMP_NUM_THREADS for its workers; plain multi-process runs on one host would otherwise
            # give every rank all cores (measured: 2.9 s/step instead of 0.2 s with 2 ranks on 2 cores).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
        _seed_all(cfg.seed)                                   # identical initial weights on every rank
        self.mcfg = build.model_config(cfg)
        from mplug2.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.mcfg.tokenizer)
        self.task = build.build_task(cfg, self.mcfg, self.tokenizer, world_size).to(device)
        if cfg.init_from:
            build.load_init(self.task, cfg.init_from)
        self.ddp = self._wrap(self.task)
        # after wrapping: FSDP2 replaces the parameters with sharded ones, the optimizer must hold those
        self.optimizer = build.build_optimizer(cfg, self.task)
        self.scheduler = build.build_scheduler(cfg, self.optimizer)
        self.loader = (self.spec.train_loader(cfg, self.tokenizer, rank, world_size) if self.spec.train_loader
                       else build.build_train_loader(cfg, self.mcfg, rank, world_size))
        self.step = 0
        _seed_all(cfg.seed * 1000 + rank + 1)                  # per-rank masking / negatives / dropout
        self.log_dir = self._log_dir()
        peak = peak_tflops(device, cfg.scale.peak_tflops)
        self.metrics = MetricsLogger(self.log_dir, rank=rank, num_devices=world_size,
                                     peak_flops=peak * 1e12 if peak else None)
        self.flops = StepFlops()                               # FLOPs per batch shape, measured once each
        self._log_uploader = BackgroundUploader("mplug2-log-upload")
        self._synced_logs: dict[str, tuple[int, int]] = {}    # log file -> (size, mtime) last uploaded
        self._logs_due = False                                 # a checkpoint was taken: sync once it is up
        self._staging = StagingBuffers(shared=True)            # CPU copies of the state, reused per checkpoint,
        self._writer = SnapshotWriter(self._staging)           # serialised by a process of their own
        self._last_ckpt: Snapshot | None = None
        self._fingerprint = cfg.fingerprint()                  # fixed for the run (hashed once, not per save)
        self.best: float | None = None

    # ------------------------------------------------------------------------------------------ setup
    def _wrap(self, task: nn.Module) -> nn.Module:
        """DDP or FSDP2 (``scale.strategy``; :mod:`mplug2.train.parallel`)."""
        # Some steps leave parameters unused under DDP: fine-tuning tasks skip modules (the decoder in
        # retrieval), and image batches (T=1) bypass the local temporal modules. Only all-video pretraining
        # uses everything.
        all_video = all(c.num_frames > 1 for c in self.cfg.data.train)
        parallel.set_activation_checkpointing(task, self.cfg.scale.activation_checkpointing)
        if self.cfg.scale.compile:
            parallel.compile_blocks(task)
        return parallel.wrap(task, strategy=self.cfg.scale.strategy, device=self.device,
                             world_size=self.world_size, precision=self.cfg.scale.precision,
                             find_unused_parameters=not (self.spec.uses_every_parameter and all_video),
                             reshard_after_forward=self.cfg.scale.reshard_after_forward)

    def _log_dir(self) -> str:
        if not storage.is_remote(self.run_dir):
            return os.path.join(self.run_dir, "logs")
        local = tempfile.mkdtemp(prefix="mplug2-logs-")
        remote = storage.join(self.run_dir, "logs", "metrics.jsonl")
        if self.rank == 0 and storage.exists(remote):          # keep the curves across restarts
            with open(os.path.join(local, "metrics.jsonl"), "wb") as f:
                f.write(storage.read_bytes(remote))
        return local

    def _sync_logs(self, background: bool = False) -> None:
        """Copy the local logs that changed since the last sync to the run's storage; ``background``: in a
        thread, off the training's critical path (one sync at a time, skipped while the previous one runs; a
        failure surfaces at the next sync)."""
        if self.rank != 0 or not storage.is_remote(self.run_dir):
            return
        self.metrics.flush()

        def upload() -> None:
            for name in os.listdir(self.log_dir):
                local = os.path.join(self.log_dir, name)
                if not os.path.isfile(local):
                    continue
                st = os.stat(local)          # before the upload: a write during it makes the next sync send it
                version = (st.st_size, st.st_mtime_ns)
                if self._synced_logs.get(name) != version:
                    storage.upload_file(local, storage.join(self.run_dir, "logs", name))
                    self._synced_logs[name] = version

        if background and self._log_uploader.busy:
            return            # the previous sync is still going: the next checkpoint (or the end) syncs again
        if background:
            self._log_uploader.submit(upload, "logs")
        else:
            self._log_uploader.wait()
            upload()

    # ----------------------------------------------------------------------------------- checkpoints
    def restore(self) -> None:
        """Resume from the newest *valid* checkpoint: the orchestrator's, or a newer one on storage.

        Ray registers a reported checkpoint asynchronously, so a worker killed right after a report may be
        handed the previous one (or none); our checkpoints validate themselves (manifest + every rank's
        marker), so the newest valid folder on storage is always safe to use, and preferring it never
        repeats steps that were already committed.
        """
        orchestrator = self.hooks.resume_from()
        candidates = list_step_checkpoints(self.run_dir)
        if orchestrator is not None and orchestrator.rstrip("/") not in [c.rstrip("/") for c in candidates]:
            candidates.insert(0, orchestrator)
        where = find_latest_valid(candidates) if candidates else None
        if where is None:
            log.info("rank %d: fresh start", self.rank)
            return
        ck = load_checkpoint(where, model=self.task, optimizer=self.optimizer, scheduler=self.scheduler,
                             rank=self.rank, world_size=self.world_size,
                             config_fingerprint=self._fingerprint)
        self.step = ck.step
        if ck.data_state is not None:
            self.loader.load_state_dict(ck.data_state)
        self.best = ck.extra.get("best")
        log.info("rank %d: resumed from %s at step %d (orchestrator offered %s)", self.rank, where, self.step,
                 orchestrator)

    def save(self, metrics: dict[str, float]) -> dict[str, float]:
        """Snapshot this rank's checkpoint part into CPU memory and report it; the hooks write and upload it
        in the background. Returns the seconds this step spent: ``ckpt_wait_s`` (waiting for the previous
        checkpoint: one in flight at most, in step order; its error surfaces here), ``ckpt_snapshot_s``; and
        ``ckpt_background_s``, what the previous checkpoint took off the critical path."""
        t0 = time.perf_counter()
        self.hooks.wait_for_upload()
        waited = time.perf_counter() - t0
        background = (self._last_ckpt.background_s or 0.0) if self._last_ckpt is not None else 0.0
        local = tempfile.mkdtemp(prefix="mplug2-ckpt-")    # the hooks delete it once uploaded
        # Rank 0 commits its own folder; Ray merges the ranks' folders; markers are checked on load.
        snap = take_snapshot(local, model=self.task, optimizer=self.optimizer, scheduler=self.scheduler,
                             step=self.step, extra={"best": self.best}, rank=self.rank, world_size=self.world_size,
                             data_state=self.loader.state_dict(), config_fingerprint=self._fingerprint,
                             buffers=self._staging, write_manifest=True, wait_for_ranks_s=0, overlap=True)
        snap.writer, snap.durable = self._writer.write, False     # a staging folder: uploaded, then deleted
        snap.make_dirs = False                                     # ... and never made again once gone
        self._last_ckpt = snap
        self._logs_due = True
        self.hooks.report(metrics, snap, self.step)
        if waited > 0.05 and self.rank == 0:
            log.info("step %d: waited %.2fs for the previous checkpoint", self.step, waited)
        return {"ckpt_wait_s": waited, "ckpt_snapshot_s": snap.taken_s, "ckpt_background_s": background}

    # ------------------------------------------------------------------------------------------- steps
    def _inject_fault(self) -> None:
        d = self.cfg.debug
        if d.fail_at_step is None or self.step != d.fail_at_step or self.rank != d.fail_rank:
            return
        marker = storage.join(self.run_dir, f".fault_injected_step{d.fail_at_step}")
        if storage.exists(marker):
            return
        storage.atomic_write(marker, b"1")
        log.warning("rank %d: injected failure after step %d (debug.fail_at_step)", self.rank, self.step)
        os._exit(17)

    def _log_keys(self, keys: list[str], corpora: list[str], epochs: list[int]) -> None:
        """Per key: its corpus and epoch (micro-batches of one step may come from different corpora)."""
        url = storage.join(self.run_dir, "keys", f"rank{self.rank}", f"step{self.step:06d}.json")
        storage.atomic_write(url, json.dumps({"step": self.step, "keys": keys, "corpora": corpora,
                                              "epochs": epochs}).encode())

    def train_step(self) -> tuple[dict[str, float], StepTimes]:
        """One optimizer step over ``grad_accum`` micro-batches; returns host-side scalars and timings."""
        cfg, k = self.cfg, self.cfg.optim.grad_accum
        times = StepTimes()
        t0 = time.perf_counter()
        self.task.train()
        totals: dict[str, torch.Tensor] = {}
        keys: list[str] = []
        epochs: list[int] = []
        corpora: list[str] = []
        autocast = parallel.autocast(self.ddp, self.device, cfg.scale.precision)
        for micro in range(k):
            td = time.perf_counter()
            batch = next(self.loader)
            times.data_wait_s += time.perf_counter() - td
            n = len(batch.get("keys", []))
            keys += batch.get("keys", [])
            epochs += [int(batch.get("epoch", -1))] * n
            corpora += [str(batch.get("corpus", ""))] * n
            batch = _to_device(batch, self.device)
            with self.flops.measure(batch), parallel.grad_sync(self.ddp, sync=micro == k - 1):   # reduce on
                with autocast:                                                                     # the last only
                    out = self.ddp(batch)
                    loss = out["loss"].float() / k
                loss.backward()
            times.flops += self.flops.of(batch)
            for name, v in out.items():   # kept on the device: one host sync per step, not per value
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    totals[name] = totals.get(name, 0.0) + v.detach().float() / k
        if self._last_ckpt is not None:      # its copy of the weights and AdamW state ran beside this step
            self._last_ckpt.wait_staged()
        if cfg.optim.grad_clip > 0:
            totals["grad_norm"] = parallel.clip_grad_norm_(self.task, cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.task, "momentum_update"):
            self.task.momentum_update()
        self.step += 1
        names = list(totals)
        values = dict(zip(names, torch.stack([totals[n].reshape(()) for n in names]).tolist())) if names else {}
        if cfg.debug.log_keys:
            self._log_keys(keys, corpora, epochs)
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        if hasattr(self.loader, "damaged_samples"):
            values["data/damaged_samples"] = float(self.loader.damaged_samples)
        times.step_time_s = time.perf_counter() - t0
        return values, times

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation on the configured eval corpus: this rank scores its slice (decoded once per
        process), the task gathers the pieces; every rank returns the same numbers. With a validation corpus
        (``data.val``) the task first tunes its inference setting there (:attr:`TaskSpec.calibrate`); what it
        chose follows the eval figures."""
        ctx = EvalContext(self.tokenizer, max_text_len=self.cfg.data.max_text_len, device=self.device,
                          options=self.cfg.options)
        chosen = {}
        if self.cfg.data.val is not None:       # TrainConfig admits it only for tasks with a calibration
            chosen = self.spec.calibrate(self.task, self._eval_data(self.cfg.data.val), ctx)
        return {**self.spec.evaluate(self.task, self._eval_data(self.cfg.data.eval), ctx), **chosen}

    def _eval_data(self, c: CorpusConfig) -> Any:
        if self.spec.load_eval is not None:      # text-only tasks read their own eval files
            return self.spec.load_eval(self.cfg, c.path, self.rank, self.world_size)
        return cached_eval_set(c.path, c.split, c.num_frames, self.mcfg.vision.image_res,
                               label_key=self.cfg.label_key, rank=self.rank, world_size=self.world_size)

    def run(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the last logged metrics (rank 0); evaluates as configured when the
        task has an evaluation and the run an eval corpus."""
        cfg, s = self.cfg, self.cfg.schedule
        evaluate = self.evaluate if self.spec.evaluate is not None and cfg.data.eval is not None else None
        global_batch = cfg.data.batch_size * cfg.optim.grad_accum * self.world_size
        last: dict[str, float] = {}
        no_ckpt = {"ckpt_wait_s": 0.0, "ckpt_snapshot_s": 0.0, "ckpt_background_s": 0.0}
        ckpt_times = no_ckpt                  # of the last checkpoint, logged with the step after it
        if self.step >= s.total_steps:
            log.info("rank %d: run already complete at step %d", self.rank, self.step)
        else:
            self._writer.start()
        bar = progress_bar(self.rank, s.total_steps, self.step, f"{cfg.task} {cfg.run_name}")
        while self.step < s.total_steps:
            values, times = self.train_step()
            self.hooks.wait_for_upload(block=False)     # a failed background upload stops the run now
            if self._logs_due and not self.hooks.upload_in_flight() and not self._log_uploader.busy:
                # the curves follow each checkpoint once it is up: never beside its snapshot, write and upload
                self._logs_due = False
                self._sync_logs(background=True)
            bar.update(1)
            bar.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}",
                            samples_s=f"{global_batch / max(times.step_time_s, 1e-9):.1f}", refresh=False)
            self._inject_fault()
            metrics = {f"loss/{k}" if k in ("loss", "itc", "itm", "mlm", "prefix_lm") else k: v
                       for k, v in values.items()}
            metrics.update(step_time_s=times.step_time_s, data_wait_s=times.data_wait_s, step_flops=times.flops,
                           **ckpt_times)
            ckpt_times = no_ckpt
            last = self.metrics.log_step(self.step, metrics, samples=global_batch) or metrics
            if self.rank == 0 and (self.step % s.log_every_steps == 0 or self.step == 1):
                log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s data-wait %.0f%%", self.step,
                         s.total_steps, values.get("loss", float("nan")), values["lr"],
                         global_batch / max(times.step_time_s, 1e-9),
                         100 * times.data_wait_s / max(times.step_time_s, 1e-9))
            final = self.step == s.total_steps
            # Checkpoint first: a failing evaluation must never cost the training state.
            if final or self.step % s.ckpt_every_steps == 0:
                ckpt_times = self.save({"step": self.step, **{k: float(v) for k, v in last.items()}})
            if evaluate is not None and (final or (s.eval_every_steps and self.step % s.eval_every_steps == 0)):
                scores = self._evaluate(evaluate)
                last.update(scores)
                self.hooks.report({"step": self.step, **{k: float(v) for k, v in last.items()}}, None, self.step)
        bar.close()
        self.hooks.wait_for_upload()            # success means every checkpoint is on storage
        self.hooks.close()
        self.finish()
        return last

    def _evaluate(self, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
        self.task.eval()
        with torch.no_grad(), parallel.full_weights(self.ddp):   # FSDP2: evaluation calls methods, not forward
            scores = evaluate()
        self.task.train()
        scores = {f"eval/{k}": float(v) for k, v in scores.items()}
        self.metrics.log_step(self.step, scores)
        main = next(iter(scores.values()), None)
        if self.rank == 0:
            log.info("eval at step %d: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
            # Ray Train keeps only metrics reported with a checkpoint: the scores also go to storage.
            record = json.dumps({"step": self.step, **scores}, sort_keys=True, indent=1).encode()
            storage.atomic_write(storage.join(self.run_dir, "eval", f"step{self.step:08d}.json"), record)
            storage.atomic_write(storage.join(self.run_dir, "eval", "latest.json"), record)
        if main is not None and (self.best is None or main > self.best):   # same scores on every rank
            self.best = main
            self.export("best")
        return scores

    def export(self, name: str) -> str:
        """Rank 0 writes the bare MPLUG2 (``save_pretrained``) under ``<run>/<name>/``, plus the task's own
        weights outside it (``head.safetensors``: a classifier head, retrieval's ITC/ITM heads) and its label
        names (``classes.json``).
        Every rank calls it: under FSDP2 the shards are gathered first (a collective)."""
        model = getattr(self.task, "model", None)
        if model is None:
            raise AttributeError("task module has no `.model` (MPLUG2) to export")
        full = parallel.full_state_dict(self.task) if parallel.is_fsdp(self.task) else None
        if self.rank != 0:
            return storage.join(self.run_dir, name)
        prefix = next(f"{n}." for n, m in self.task.named_modules() if m is model)
        if full is not None:        # an unsharded copy; its random init must not move this rank's RNG
            from mplug2.models.mplug2 import MPLUG2

            with torch.random.fork_rng(devices=[]):
                model = MPLUG2(self.mcfg)
            model.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            # The task's own trained heads (a classifier; retrieval's ITC projections and ITM head, which
            # inference needs for embeddings): parameters outside the model, momentum twins excluded.
            state = full if full is not None else self.task.state_dict()
            own = {n for n, _ in self.task.named_parameters() if not n.startswith(prefix) and ".momentum." not in n}
            head = {k: v.detach().cpu().contiguous() for k, v in state.items() if k in own}
            if head:
                from safetensors.torch import save_file

                save_file(head, os.path.join(tmp, "head.safetensors"))
            for fname, payload in self.spec.export_files(self.task).items():
                with open(os.path.join(tmp, fname), "wb") as f:
                    f.write(payload)
            for fname in os.listdir(tmp):
                with open(os.path.join(tmp, fname), "rb") as f:
                    storage.atomic_write(storage.join(self.run_dir, name, fname), f.read())
        return storage.join(self.run_dir, name)

    def finish(self) -> None:
        """Rank 0: export the final model and the curves PNG; close loaders and writers (the checkpoint writer
        process too: the last checkpoint was waited for)."""
        self._writer.close()
        report = self.loader.damage_report() if hasattr(self.loader, "damage_report") else ""
        if report:   # the run summary: what was skipped, where
            log.warning("rank %d: damaged training data skipped:\n%s", self.rank, report)
        self.loader.close()
        self.export("final")        # every rank: FSDP2 gathers the shards, rank 0 writes
        if self.rank == 0:
            self._log_uploader.wait()          # the jsonl is rewritten below: no upload may be reading it
            self.metrics.flush()
            jsonl = os.path.join(self.log_dir, "metrics.jsonl")
            if os.path.exists(jsonl):
                dedupe_by_step(jsonl)
                png = os.path.join(self.log_dir, "curves.png")
                plot_curves(jsonl, png)
            self._sync_logs()
        self._log_uploader.close()
        self.metrics.close()
        self._remove_local_logs()

    def abort(self) -> None:
        """A failed run: close the metric writers and remove the local temp copy of a remote run's logs (the
        curves went up after each checkpoint's upload; the resumed run redoes the steps after the last one);
        stop the checkpoint writer process (after the write in progress, if any)."""
        try:
            self._writer.close()
            self.metrics.close()
        except Exception as exc:                # the run's own error is the one to raise
            log.warning("rank %d: closing the writers of a failed run: %r", self.rank, exc)
        self._remove_local_logs()

    def close(self) -> None:
        """Release what a loop driven step by step holds (benchmarks, tests): the loader's workers, the
        checkpoint writer process, the metric writers and the local temp copy of a remote run's logs. Nothing
        is exported or uploaded: :meth:`run` ends with :meth:`finish` instead."""
        self.loader.close()
        self.abort()

    def _remove_local_logs(self) -> None:
        if storage.is_remote(self.run_dir):     # the local copy of the logs (synced to storage) is a temp folder
            shutil.rmtree(self.log_dir, ignore_errors=True)


def progress_bar(rank: int, total: int, initial: int, desc: str):
    """Rank 0's step bar (loss, samples/s). Shown when stderr is a terminal, or forced with
    ``MPLUG2_PROGRESS=1`` (then refreshed every 30 s, for log files); ``MPLUG2_PROGRESS=0`` hides it. Ray
    Train workers write to log files, where the periodic ``step ...`` log lines carry the same numbers."""
    from tqdm.auto import tqdm

    setting = os.environ.get("MPLUG2_PROGRESS", "")
    tty = sys.stderr.isatty()
    show = rank == 0 and (setting == "1" or (tty and setting != "0"))
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not show,
                mininterval=0.5 if tty else 30.0, dynamic_ncols=True)


def dedupe_by_step(jsonl: str) -> None:
    """Keep the last record of each (step, key set): steps redone after a restart replace the lost ones."""
    rows: dict[tuple, dict] = {}
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(r["step"], tuple(sorted(k for k in r if k not in ("time",))))] = r
    with open(jsonl, "w", encoding="utf-8") as f:
        for key in sorted(rows, key=lambda k: (k[0], k[1])):
            f.write(json.dumps(rows[key], sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------ Ray Train binding

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    loop = TrainLoop(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                     device=ray.train.torch.get_device(), hooks=RayHooks(cfg))
    _run_or_abort(loop)


def _run_or_abort(loop: TrainLoop) -> dict[str, float]:
    """Restore and run; on failure release what the loop holds locally before the error propagates."""
    try:
        loop.restore()
        return loop.run()
    except BaseException:
        loop.abort()
        raise


# ------------------------------------------------------------------------- plain torch.distributed binding

def run_local(cfg: TrainConfig, device: str = "cpu") -> dict[str, float]:
    """Train in this process (world size from torch.distributed if initialised, else 1)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    loop = TrainLoop(cfg, rank=rank, world_size=world, device=torch.device(device), hooks=LocalHooks(cfg, rank))
    return _run_or_abort(loop)
