"""Model benchmark: forward + backward time and peak memory per training step, with MFU on CUDA.

One step = the VQA-style path through every module: vision -> universal layers -> text encoder -> fusion ->
decoder on [V_f ; T_f] (+ the MLM head on T_f), loss backward. Each preset runs in its own child process so that
peak memory (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) belongs to that preset alone.

    python bench/bench_model.py                                   # tiny and base, CPU, fp32, 8 frames, batch 2
    python bench/bench_model.py --device cuda --dtype bf16 --presets base --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mplug2.config import MPLUG2Config  # noqa: E402



def make_batch(cfg: MPLUG2Config, batch: int, frames: int, text_len: int, answer_len: int, device: str):
    g = torch.Generator().manual_seed(0)
    res = cfg.vision.image_res
    pixels = torch.randn(batch, 3, frames, res, res, generator=g)
    vocab = cfg.text.vocab_size
    ids = torch.randint(5, vocab, (batch, text_len), generator=g)
    ans = torch.randint(5, vocab, (batch, answer_len), generator=g)
    ids[:, 0] = ans[:, 0] = cfg.decoder.bos_token_id
    mask = torch.ones_like(ids)
    mask[0, text_len // 2:] = 0  # some padding
    amask = torch.ones_like(ans)
    return [t.to(device) for t in (pixels, ids, mask, ans, amask)]


def train_step(model, pixels, ids, mask, ans, amask, autocast) -> torch.Tensor:
    with autocast():
        v, vm = model.encode_vision(pixels)
        t = model.encode_text(ids, mask)
        vf, tf = model.fuse(t, mask, v, vm)
        out = model.decode(ans, amask, torch.cat([vf, tf], 1), torch.cat([vm, mask], 1), ans,
                           reduction="sequence_sum")
        loss = out.loss + model.mlm_logits(tf).float().logsumexp(-1).mean() * 0.0
    loss.backward()
    return loss.detach()


def run_child(args: argparse.Namespace) -> dict:
    preset = args.child
    torch.manual_seed(0)
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    cfg = MPLUG2Config.preset(preset)
    cfg.num_frames = args.frames
    cfg.activation_checkpointing = args.checkpointing
    cfg.text.hidden_dropout = cfg.text.attn_dropout = 0.0
    from mplug2.models.mplug2 import MPLUG2

    model = MPLUG2(cfg).to(device).train()
    n_params = sum(model.parameter_counts().values())
    if args.compile:
        from mplug2.train.parallel import compile_blocks

        compile_blocks(model)                 # per transformer block, as `scale.compile: true` trains
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]

    def autocast():
        if dtype is None:
            return torch.autocast(device_type=device, enabled=False)
        return torch.autocast(device_type=device, dtype=dtype)

    text_len = min(args.text_len, cfg.text.max_positions)
    answer_len = min(args.answer_len, cfg.text.max_positions)
    batch = make_batch(cfg, args.batch, args.frames, text_len, answer_len, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    for _ in range(args.warmup):
        train_step(model, *batch, autocast)
        model.zero_grad(set_to_none=True)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        train_step(model, *batch, autocast)
        sync()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak_mem = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    try:    # one more step, under a dispatch mode: it can need more memory than the timed steps did
        with counter:
            train_step(model, *batch, autocast)
        flops = counter.get_total_flops()
    except torch.OutOfMemoryError:
        flops = None
        print(f"[bench] {preset}: the FLOP count's extra step ran out of device memory after the timed steps "
              f"(peak {peak_mem / 2 ** 30:.1f} GiB); no FLOPs / MFU for this shape", file=sys.stderr, flush=True)
    model.zero_grad(set_to_none=True)
    step = sorted(times)[len(times) // 2]
    nv = 1 + args.frames * cfg.vision.grid ** 2
    from mplug2.train.flops import peak_tflops

    peak = peak_tflops(torch.device(device))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"preset": preset, "device": device, "dtype": args.dtype, "params": n_params, "batch": args.batch,
            "frames": args.frames, "visual_tokens": nv, "step_s": step, "min_step_s": min(times),
            "samples_per_s": args.batch / step, "peak_mem_gib": peak_mem / 2 ** 30,
            "rss_before_gib": rss_before * 1024 / 2 ** 30, "flops_per_step": flops,
            "achieved_tflops": flops / step / 1e12 if flops else None,
            "mfu": flops / step / (peak * 1e12) if peak and flops else None, "peak_tflops": peak, "gpu": gpu,
            "compile": args.compile, "checkpointing": args.checkpointing}


def _num(value: float | None, unit: float, width: int) -> str:
    return f"{value / unit:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--answer-len", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (raise --warmup)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return 0

    rows = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--child", preset, "--device", args.device, "--dtype", args.dtype,
               "--batch", str(args.batch), "--frames", str(args.frames), "--text-len", str(args.text_len),
               "--answer-len", str(args.answer_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)] + (["--checkpointing"] if args.checkpointing else []) \
            + (["--compile"] if args.compile else [])
        print(f"[bench] {preset}: {args.device} {args.dtype}, batch {args.batch}, {args.frames} frames ...",
              file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            print(f"[bench] {preset} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        for note in (ln for ln in proc.stderr.splitlines() if ln.startswith("[bench]")):
            print(note, file=sys.stderr)
        rows.append(json.loads(lines[-1][len("RESULT "):]))

    hdr = (f"{'preset':<7}{'device':<7}{'dtype':<6}{'params':>9}{'batch':>6}{'frames':>7}{'vis.tok':>8}"
           f"{'step s':>9}{'samples/s':>10}{'peak GiB':>9}{'TFLOP/step':>11}{'TFLOP/s':>9}{'MFU':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['preset']:<7}{r['device']:<7}{r['dtype']:<6}{r['params'] / 1e6:>8.1f}M{r['batch']:>6}"
              f"{r['frames']:>7}{r['visual_tokens']:>8}{r['step_s']:>9.3f}{r['samples_per_s']:>10.2f}"
              f"{r['peak_mem_gib']:>9.2f}{_num(r['flops_per_step'], 1e12, 11)}{_num(r['achieved_tflops'], 1, 9)}{mfu:>7}")
    peak_note = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "process peak RSS (ru_maxrss)"
    peaks = sorted({(r["gpu"], r["peak_tflops"]) for r in rows if r["peak_tflops"]})
    print(f"peak memory = {peak_note}; FLOPs from torch.utils.flop_counter on one real fwd+bwd; MFU vs "
          + (", ".join(f"{p:.0f} TFLOP/s ({g}, dense bf16, mplug2.train.flops)" for g, p in peaks) or "- (no peak)")
          + ("; blocks compiled" if args.compile else "; eager"))
    if args.checkpointing:
        print("with --checkpointing the counted FLOPs include the recomputed forward: the MFU column is HFU")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
