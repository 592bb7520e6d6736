"""Batch inference over a shard corpus: samples/s of one shard task (``infer_shard``: read + check, eval decode,
model, parquet commit) in this process, and of the ``jobs.infer`` run end to end on a new private local Ray (start-up,
actor pool, model load included).

    python -m bench infer                                        # tiny preset, random weights, CPU
    python -m bench infer --preset base --device cuda --clips 512 --batch-size 64 --frames 8
    python -m bench infer --task caption --clips 64

The corpus is the synthetic video-text corpus (``pipelines.synthetic``) preprocessed once into local shards at the
model's resolution. Wall time and CPU time (this process) are printed; the machine may be shared, so read the load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mplug2.config import PRESET_NAMES, MPLUG2Config  # noqa: E402


def _corpus(root: Path, clips: int, per_shard: int, frames: int, res: int) -> Path:
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_video_corpus

    manifest = make_video_corpus(root / "src", clips, seed=0, num_frames=max(frames, 8), size=max(res, 32))
    summary = preprocess(PreprocessConfig(manifest=[str(manifest)], output=str(root / "shards"), modality="video",
                                          samples_per_shard=per_shard, num_frames=frames, frame_size=res,
                                          executor="local", progress=False))
    if summary.successes != clips:
        raise SystemExit(f"corpus: {summary.successes} of {clips} clips preprocessed")
    return root / "shards"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--task", choices=("embed", "caption", "qa"), default="embed")
    p.add_argument("--device", default="cpu", help="cpu | cuda (bf16)")
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--frames", type=int, help="frames per clip (default: the preset's num_frames)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    from mplug2.data.dataset_index import load_index
    from mplug2.inference.corpus import InferOptions, infer_shard, resolve_device
    from mplug2.inference.predictor import Predictor
    from mplug2.models.mplug2 import MPLUG2

    cfg = MPLUG2Config.preset(args.preset)
    frames = args.frames or cfg.num_frames
    with tempfile.TemporaryDirectory(prefix="mplug2-bench-infer-") as tmp:
        root = Path(tmp)
        shards = _corpus(root, args.clips, args.per_shard, frames, cfg.vision.image_res)
        torch.manual_seed(0)
        model = MPLUG2(cfg).save_pretrained(root / "model")
        device, dtype = resolve_device(args.device)
        predictor = Predictor.load(str(model), device=device, dtype=dtype, num_frames=frames)
        options = InferOptions(task=args.task, batch_size=args.batch_size, max_len=8)
        index = load_index(str(shards))
        infer_shard(predictor, index.shards[0], str(root / "warmup"), options)      # warm-up (allocator, kernels)
        c0, t0 = time.process_time(), time.perf_counter()
        results = [infer_shard(predictor, s, str(root / "inproc"), options) for s in index.shards]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert all(r.status == "done" for r in results), results

        # A private local Ray (fresh temp dir: never another `ray start` cluster on the machine), started inside
        # the timed region as `mplug2-infer` without --address would.
        from jobs.infer import build_parser, run
        from mplug2.runtime import init_ray

        import ray

        ray_temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")     # short: Ray's socket paths have a length limit
        t1 = time.perf_counter()
        try:
            init_ray(temp_dir=ray_temp, num_cpus=os.cpu_count())
            summary = run(build_parser().parse_args([
                args.task, "--model", str(model), "--shards", str(shards), "--output", str(root / "ray"),
                "--batch-size", str(args.batch_size), "--device", "auto" if args.device != "cpu" else "cpu",
                "--max-workers", "1", "--no-progress"]))
            ray_wall = time.perf_counter() - t1
        finally:
            ray.shutdown()
            shutil.rmtree(ray_temp, ignore_errors=True)
        if summary.exit_code != 0:
            raise SystemExit(summary.table())

    n = index.num_samples
    print(f"\nmplug2-infer {args.task}: {args.preset} preset, {n} clips x {frames} frames at "
          f"{cfg.vision.image_res}px, batch {args.batch_size}, {device} ({dtype or torch.float32}); "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'path':44s} {'wall s':>8s} {'samples/s':>10s} {'CPU s':>8s}")
    print(f"{'infer_shard in process (one actor)':44s} {wall:8.2f} {n / wall:10.1f} {cpu:8.2f}")
    print(f"{'jobs.infer on a new local Ray, 1 actor':44s} {ray_wall:8.2f} {n / ray_wall:10.1f} {'-':>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
