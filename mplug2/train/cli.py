"""``mplug2-train``: pretrain, fine-tune or evaluate mPLUG-2 from a YAML config.

    mplug2-train pretrain --config configs/pretrain_tiny.yaml --run-name pt-tiny-001
    mplug2-train finetune --config configs/retrieval_tiny.yaml --run-name ret-001 \\
        --set init_from=s3://bucket/runs/pt-tiny-001/final
    mplug2-train evaluate --task retrieval --model s3://bucket/runs/ret-001/best --eval s3://bucket/corpora/x/test

Re-running a command with the same ``--run-name`` (and storage) resumes it. ``--address`` (or RAY_ADDRESS)
connects to a cluster; without it a local Ray starts on 127.0.0.1. The same module is the ``ray job
submit`` entrypoint: ``python -m mplug2.train.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from mplug2.paths import config_file
from mplug2.runtime import init_ray, setup_process_env
import yaml

from mplug2.train.config import TrainConfig
from mplug2.train.tasks import REGISTRY, describe_tasks, get_task

log = logging.getLogger("mplug2.train")


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def load_config(args: argparse.Namespace, task: str | None) -> TrainConfig:
    overrides = _parse_sets(args.set)
    if args.run_name:
        overrides["run_name"] = args.run_name
    if args.storage:
        overrides["storage"] = args.storage
    if task:
        overrides.setdefault("task", task)
    # relative paths are made absolute here, on the driver (mplug2.paths): workers run in other folders
    try:
        return TrainConfig.from_yaml(config_file(args.config), overrides).resolve_paths()
    except (OSError, ValueError, TypeError) as e:
        raise ConfigFileError(f"{args.config}: {e}") from e


class ConfigFileError(ValueError):
    """The run config cannot be read or names an unusable path / placeholder."""


def _check_init_from(cfg: TrainConfig) -> None:
    """A fresh run's ``init_from`` names weights that exist, checked here before Ray starts: in a worker, a
    wrong path surfaced as a training-function traceback after the cluster came up."""
    from mplug2.train.build import resolve_init
    from mplug2.train.trainer import has_previous_run

    if cfg.init_from is None or has_previous_run(cfg):      # a resumed run starts from its own checkpoint
        return
    try:
        resolve_init(cfg.init_from)
    except FileNotFoundError as e:
        raise ConfigFileError(f"init_from={e}; set it to a pretraining run's folder or a model folder "
                              "(--set init_from=...)") from e


def _check_eval_corpora(cfg: TrainConfig) -> None:
    """The eval and validation corpora have shards of their split, checked here before Ray starts: a wrong path
    otherwise failed the run's evaluation after the whole training (and a resumed complete run does not evaluate
    again). Text-only tasks read their own eval files and check them in their preflight."""
    from mplug2.data.dataset_index import load_index

    spec = get_task(cfg.task)
    if spec.evaluate is None or spec.load_eval is not None:
        return
    for name, corpus in (("data.eval", cfg.data.eval), ("data.val", cfg.data.val)):
        if corpus is None:
            continue
        try:
            load_index(corpus.path, corpus.split)
        except (OSError, ValueError) as e:
            raise ConfigFileError(f"{name} (split {corpus.split!r}): {e}; point {name}.path at a folder of shards "
                                  f"(`mplug2-data shard --split {corpus.split}`)") from e


def _train(args: argparse.Namespace, task: str | None) -> int:
    from mplug2.train.trainer import fit, latest_eval, run_dir

    cfg = load_config(args, task)
    if task == "pretrain" and cfg.task != "pretrain":
        raise SystemExit(f"config task is {cfg.task!r}; use `mplug2-train finetune`")
    if task is None and cfg.task == "pretrain":
        raise SystemExit("config task is 'pretrain'; use `mplug2-train pretrain`")
    try:
        get_task(cfg.task).preflight(cfg)
    except (OSError, ValueError) as e:
        raise ConfigFileError(str(e)) from e
    _check_init_from(cfg)
    _check_eval_corpora(cfg)
    init_ray(args.address, num_cpus=args.num_cpus)
    t0 = time.time()
    result = fit(cfg)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics.update({k: v for k, v in latest_eval(cfg).items() if k != "step"})
    print(f"run {cfg.run_name} finished in {time.time() - t0:.0f}s; outputs in {run_dir(cfg)}")
    for k in sorted(metrics):
        print(f"  {k:28s} {metrics[k]:.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from mplug2.train.build import load_exported_task, model_config
    from mplug2.train.evalset import load_eval_set
    from mplug2.train.tasks import EvalContext, get_task

    setup_process_env()
    spec = get_task(args.task)
    options = {k: yaml.safe_load(v) for k, v in _parse_sets(args.option).items()}
    try:
        exported = load_exported_task(args.model, args.task, options, label_key=args.label_key)
    except ValueError as e:
        raise SystemExit(f"{args.model}: {e}") from None
    task, tok, cfg = exported.module, exported.tokenizer, exported.config
    mcfg = model_config(cfg)
    try:
        data = spec.load_eval(cfg, args.eval, 0, 1) if spec.load_eval else load_eval_set(
            args.eval, args.split, args.frames, mcfg.vision.image_res, max_items=args.max_items,
            label_key=args.label_key)
    except (OSError, ValueError) as e:
        raise SystemExit(f"mplug2-train: error: {e}") from None
    with torch.no_grad():
        scores = spec.evaluate(task, data, EvalContext(tok, max_text_len=args.max_text_len, options=cfg.options))
    print(json.dumps(scores, indent=1, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mplug2-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    finetune_help = "fine-tune a task with evaluation and a best export; the task is the config's `task:`"
    for name, help_, epilog in [("pretrain", get_task("pretrain").summary, None),
                                ("finetune", finetune_help, "tasks (configs/*_tiny.yaml):\n" + describe_tasks())]:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", required=True, help="run YAML (see configs/)")
        sp.add_argument("--run-name", help="stable run id: re-running with the same name resumes")
        sp.add_argument("--storage", help="runs root: local folder or s3://bucket/prefix")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set schedule.total_steps=200 (repeatable)")
        sp.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
        sp.add_argument("--num-cpus", type=int, help="CPUs for a local Ray")
    ev = sub.add_parser("evaluate", help="score an exported model on a shard corpus",
                        epilog="tasks:\n" + describe_tasks(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--task", choices=[s.name for s in REGISTRY.values() if s.evaluate is not None], required=True)
    ev.add_argument("--model", required=True, help="folder with config.yaml + model.safetensors (local or s3://)")
    ev.add_argument("--eval", required=True, help="shard dataset prefix (local or s3://); text_classify: a tsv")
    ev.add_argument("--split", default="train", help="shard name prefix of the eval set")
    ev.add_argument("--frames", type=int, default=4)
    ev.add_argument("--max-items", type=int)
    ev.add_argument("--max-text-len", type=int, default=30)
    ev.add_argument("--label-key", default="label", help="classify: the json field holding each sample's label")
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a task option, e.g. --option k_test=32 for retrieval (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mplug2.storage import StorageCredentialsError

    try:
        if args.cmd == "evaluate":
            return _evaluate(args)
        return _train(args, "pretrain" if args.cmd == "pretrain" else None)
    except (StorageCredentialsError, ConfigFileError) as e:   # a bad config / path, missing credentials: one line
        print(f"mplug2-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
