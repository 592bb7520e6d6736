"""Rank-0 training metrics: TensorBoard scalars, a jsonl copy, and PNG curves at the end of a run.

Ray Train V2 keeps only metrics attached to checkpoints, so per-step numbers go straight from rank 0 to
TensorBoard (``training-and-ops.md`` §1.3); the jsonl copy makes runs diffable and plottable without TB.
MFU = (FLOPs per sample x samples/s per device) / peak FLOP/s, with FLOPs per sample measured once
(:func:`flops_per_sample`, ``torch.utils.flop_counter`` on a real forward + backward), or, from the training
loop, achieved FLOP/s = ``step_flops`` (this device's FLOPs in the step, :class:`mplug2.train.flops.StepFlops`)
/ step time; the peak comes from :func:`mplug2.train.flops.peak_tflops`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "plot_curves", "flops_per_sample"]


def flops_per_sample(step_fn: Callable[[], Any], batch_size: int) -> float:
    """FLOPs of one sample's forward + backward, counted on a real call of ``step_fn`` (which must run the
    forward and ``backward()`` for a batch of ``batch_size``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_fn()
    return counter.get_total_flops() / batch_size


class MetricsLogger:
    """Log scalars per step on rank 0 (other ranks get a no-op logger, so the loop needs no rank checks).

    Derived values, when their inputs are given to :meth:`log_step`: ``samples_per_s`` (= samples / step_time),
    ``samples_per_s_per_device``, ``data_wait_frac`` (= data_wait_s / step_time), ``tflops`` (achieved TFLOP/s
    per device, from ``step_flops``), ``mfu`` (needs ``peak_flops``: without one, e.g. on a CPU with no
    ``scale.peak_tflops``, MFU is not logged and a line says so once).
    """

    def __init__(self, log_dir: str, *, rank: int = 0, flops_per_sample: float | None = None,
                 peak_flops: float | None = None, num_devices: int = 1, flush_every: int = 20) -> None:
        self.enabled = rank == 0
        self.log_dir, self.flops_per_sample, self.peak_flops = log_dir, flops_per_sample, peak_flops
        self.num_devices, self.flush_every = max(1, num_devices), flush_every
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self._writer = None
        self._jsonl = None
        self._n = 0
        self._warned_no_peak = False
        if self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def derived(self, metrics: Mapping[str, float], samples: int | None) -> dict[str, float]:
        out = dict(metrics)
        step_time = metrics.get("step_time_s")
        if step_time and step_time > 0:
            if samples is not None:
                out["samples_per_s"] = samples / step_time
                out["samples_per_s_per_device"] = out["samples_per_s"] / self.num_devices
                if self.flops_per_sample and self.peak_flops:
                    out["mfu"] = self.flops_per_sample * out["samples_per_s_per_device"] / self.peak_flops
            if "data_wait_s" in metrics:
                out["data_wait_frac"] = metrics["data_wait_s"] / step_time
            if metrics.get("step_flops"):
                out["tflops"] = metrics["step_flops"] / step_time / 1e12
                if self.peak_flops:
                    out["mfu"] = out["tflops"] * 1e12 / self.peak_flops
                elif not self._warned_no_peak:
                    self._warned_no_peak = True
                    log.info("MFU not logged: no peak FLOP/s known for this device (set scale.peak_tflops); "
                             "achieved TFLOP/s is logged as `tflops`")
        return out

    def log_step(self, step: int, metrics: Mapping[str, float], *, samples: int | None = None) -> dict[str, float]:
        """Record one optimizer step. ``metrics`` holds e.g. ``loss/itc``, ``lr``, ``step_time_s``,
        ``data_wait_s``, ``ckpt_wait_s``; ``samples`` = global samples in the step. Returns what was logged."""
        if not self.enabled:
            return {}
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        values = self.derived(values, samples)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            log.warning("step %d: non-finite metrics %s", step, bad)
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}, sort_keys=True) + "\n")
        self._n += 1
        if self._n % self.flush_every == 0:
            self.flush()
        return values

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def recent_means(jsonl_text: str, keys: tuple[str, ...], last: int = 50) -> dict[str, float]:
    """Mean of each metric over its last ``last`` logged steps (one record per step: the last wins).

    A figure read off the final step alone is one batch's worth of noise (ITM accuracy on 96 pairs moves by
    several points from step to step); a run's summary should say where the curve ended, not where it dipped."""
    by_step: dict[int, dict] = {}
    for line in jsonl_text.splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = {**by_step.get(int(rec["step"]), {}), **rec}
    out = {}
    for k in keys:
        vals = [by_step[s][k] for s in sorted(by_step) if isinstance(by_step[s].get(k), (int, float))][-last:]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def plot_curves(jsonl_path: str, out_png: str, *, keys: list[str] | None = None) -> list[str]:
    """One panel per metric (default: every numeric key) against step; returns the keys plotted.

    Metrics logged at many steps are lines; metrics logged at a few steps (evaluations) are points with their
    values written beside them; metrics logged once go into one table panel (a single point is no curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    if not rows:
        raise ValueError(f"{jsonl_path}: no metrics to plot")
    all_keys = sorted({k for r in rows for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))})
    keys = [k for k in (keys or all_keys) if k in all_keys]
    if not keys:
        raise ValueError(f"{jsonl_path}: none of the requested metrics present (have {all_keys})")
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    once = [k for k in keys if len(series[k]) == 1]
    panels = [k for k in keys if len(series[k]) > 1]
    cols = min(3, len(panels)) if panels else 1
    curve_rows = math.ceil(len(panels) / cols) if panels else 0
    # the metrics logged once (an evaluation's figures, often 20 or more): a table across the figure's width, in
    # up to three (metric, value) column groups, each row a fixed 0.22 in, so that no row is cut off
    groups = min(3, len(once))
    lines = math.ceil(len(once) / groups) if once else 0
    table_h = 0.22 * (lines + 1) + 0.35 if once else 0.0
    width = 4.5 * max(cols, groups)
    height = 3 * curve_rows + table_h + 0.4 + (1.35 if once and curve_rows else 0.0)
    # Panels of a fixed size with fixed margins (inches): tight_layout measured every label of every panel and
    # took ~40 % of the plot's time, ~1 s at the end of every run.
    fig = plt.figure(figsize=(width, height))
    n_rows = curve_rows + (1 if once else 0)
    grid = fig.add_gridspec(n_rows, max(cols, groups), height_ratios=[3] * curve_rows + ([table_h] if once else []),
                            left=0.75 / width, right=1 - 0.2 / width, bottom=0.1 / height, top=1 - 0.3 / height,
                            wspace=0.3, hspace=1.35 / ((3 * curve_rows + table_h) / n_rows))   # ~1.35 in between
    for i, k in enumerate(panels):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        pts = series[k]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) <= 10:                       # evaluations: points, each with its value
            ax.plot(xs, ys, "o-", lw=1, ms=5)
            for x, y in pts:
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        else:
            ax.plot(xs, ys, lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    if once:
        ax = fig.add_subplot(grid[curve_rows, :])
        ax.axis("off")
        steps = {series[k][0][0] for k in once}
        same_step = len(steps) == 1

        def cell(k: str) -> list[str]:
            step, value = series[k][0]
            return [k, f"{value:.4g}" + ("" if same_step else f" (step {step})")]

        cells = [sum((cell(once[g * lines + i]) if g * lines + i < len(once) else ["", ""] for g in range(groups)),
                     []) for i in range(lines)]
        table = ax.table(cellText=cells, colLabels=["metric", "value"] * groups, cellLoc="left", bbox=[0, 0, 1, 1],
                         colWidths=[0.72 / groups, 0.28 / groups] * groups)
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        ax.set_title(f"logged once (step {steps.pop()})" if same_step else "logged once", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return keys
