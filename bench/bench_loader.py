"""Loader-only throughput (samples/s) and CPU cost (ms of CPU per sample, summed over the main process and every
DataLoader worker) for image (T=1) and video (8 frames) shards, per transform path:

- ``pil``: the per-frame PIL reference transforms (the path before issue 13, ``LoaderConfig.pil_transforms``);
- ``cpu``: decode at size + tensor crop/resize + batched RandAugment and normalisation in the workers;
- ``device``: the workers stop after decode + crop/resize (uint8); flip is folded in, RandAugment and
  normalisation run on the training device (not counted here: that is the point).

    python -m bench loader                                        # 224 px, local, all three paths
    python -m bench loader --where local,s3 --res 32,224 --path cpu

Storage is a local folder or S3 (an embedded SeaweedFS on 127.0.0.1).

Shards are written once per run to a scratch folder. By default they hold what the preprocessing pipeline
writes with its defaults (``--stored pipeline``: images ``image_size`` 256, frames ``frame_size`` 224, JPEG
quality 95, 4:2:0); ``--stored 1.15`` stores both at 1.15 x res instead (the figures before issue 13's decode
work). Timing starts after ``--warmup`` batches (default: every worker's prefetch queue filled once, so worker
start-up, tokenizer loading and first-call costs are excluded; the first batch's wall time is reported
separately) and covers tar reading, decode, train transforms (RandomResizedCrop + flip + RandAugment),
tokenisation, collation and the hand-over to the main process. CPU time is read from ``/proc/<pid>/stat`` of
every worker and the main process over the timed window, so it holds on a shared machine where wall time does
not; the 1-minute load average is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mplug2.runtime import setup_process_env  # noqa: E402

setup_process_env()

from mplug2.data import defaults  # noqa: E402
from mplug2.data.loader import LoaderConfig, build_loader  # noqa: E402
from pipelines.config import PreprocessConfig  # noqa: E402
from tests.data.shards_fixture import write_shards  # noqa: E402


PATHS = {"pil": dict(pil_transforms=True), "cpu": dict(augment_on="cpu"), "device": dict(augment_on="device")}
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process, all its threads (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def stored_frames(modality: str, res: int, stored: str) -> tuple[int, int]:
    """(side, JPEG quality) of the stored images / frames: the pipeline's defaults, or ``stored`` x res."""
    pipe = PreprocessConfig()
    if stored == "pipeline":
        return (pipe.frame_size if modality == "video" else pipe.image_size), pipe.jpeg_quality
    return int(round(res * float(stored))), pipe.jpeg_quality


def run_case(prefix: str, *, frames: int, res: int, batch_size: int, batches: int, num_workers: int,
             path: str = "cpu", warmup: int = 0) -> dict:
    cfg = LoaderConfig(prefix=prefix, corpus="bench", batch_size=batch_size, num_workers=num_workers, res=res,
                       num_frames=max(1, frames), shuffle_buffer=256, **PATHS[path])
    loader = build_loader(cfg)
    t0 = time.perf_counter()
    next(loader)
    startup = time.perf_counter() - t0
    for _ in range(warmup):
        next(loader)
    pids = [os.getpid(), *loader.worker_pids()]
    cpu0 = [_cpu_s(p) for p in pids]
    t1 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t1
    cpu = [_cpu_s(p) - c for p, c in zip(pids, cpu0)]
    loader.close()
    n = batches * batch_size
    return {"startup_s": round(startup, 2), "samples_per_s": round(n / dt, 1),
            "cpu_ms_per_sample": round(1e3 * sum(cpu) / n, 2), "main_ms_per_sample": round(1e3 * cpu[0] / n, 2),
            "load_1min": round(os.getloadavg()[0], 1)}


def default_warmup(num_workers: int) -> int:
    """Batches to skip before timing: every worker has filled its prefetch queue once."""
    return max(1, num_workers) * (defaults.PREFETCH_FACTOR + 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--where", default="local", help="comma list of local,s3")
    ap.add_argument("--modality", default="image,video", help="comma list of image,video")
    ap.add_argument("--res", default="224", help="comma list of training resolutions")
    ap.add_argument("--path", default="pil,cpu,device", help=f"comma list of {','.join(PATHS)}")
    ap.add_argument("--texture", default="natural", choices=("natural", "noise"),
                    help="stored frames: smooth colour fields + mild noise (photo-like JPEG size and decode cost), "
                         "or uniform +-30 noise per pixel (worst-case entropy; the figures before issue 13)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--stored", default="pipeline",
                    help="stored frame size: 'pipeline' (the preprocessing defaults: images 256, frames 224) or a "
                         "factor of res (1.15: 258 px for 224)")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per case")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed batches after the first (default: num_workers x (prefetch_factor + 1))")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=200)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    where = args.where.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    server = None
    rows = []
    try:
        if "s3" in where:
            from mplug2.s3server import S3Server, apply_client_env

            server = S3Server(root=scratch / "s3", buckets=("bench",))
            server.start()
            apply_client_env(server)
        for modality in args.modality.split(","):
            frames = 8 if modality == "video" else 0
            for res in map(int, args.res.split(",")):
                stored, quality = stored_frames(modality, res, args.stored)
                for loc in where:
                    prefix = (f"s3://bench/{modality}-{res}" if loc == "s3" else str(scratch / f"{modality}-{res}"))
                    t0 = time.perf_counter()
                    write_shards(prefix, [args.samples_per_shard] * args.shards, frames=frames, size=(stored, stored),
                                 texture=args.texture, quality=quality)
                    write_s = time.perf_counter() - t0
                    warm = default_warmup(args.num_workers) if args.warmup is None else args.warmup
                    need = (args.batches + warm + 1) * args.batch_size
                    if need > args.shards * args.samples_per_shard:
                        raise SystemExit(f"need {need} samples: raise --shards or --samples-per-shard")
                    for path in args.path.split(","):
                        r = run_case(prefix, frames=frames, res=res, batch_size=args.batch_size,
                                     batches=args.batches, num_workers=args.num_workers, path=path,
                                     warmup=warm)
                        row = {"modality": modality, "T": max(1, frames), "res": res, "stored": stored,
                               "where": loc, "path": path, **r,
                               "frames_per_s": round(r["samples_per_s"] * max(1, frames), 1),
                               "write_s": round(write_s, 1)}
                        rows.append(row)
                        print(f"{modality:5s} T={row['T']} res={res:3d} stored={stored} {loc:5s} {path:6s} "
                              f"{row['samples_per_s']:8.1f} samples/s  {row['cpu_ms_per_sample']:6.2f} CPU ms/sample "
                              f"(main {row['main_ms_per_sample']}), load {row['load_1min']}, start-up {row['startup_s']}s",
                              flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n| modality | T | res | stored | storage | path | CPU ms/sample (all processes) | of which main "
          "| samples/s | frames/s | load (1 min) | first batch (s) |\n" + "|---" * 12 + "|")
    for r in rows:
        print(f"| {r['modality']} | {r['T']} | {r['res']} | {r['stored']} | {r['where']} | {r['path']} "
              f"| {r['cpu_ms_per_sample']} | {r['main_ms_per_sample']} | {r['samples_per_s']} | {r['frames_per_s']} "
              f"| {r['load_1min']} | {r['startup_s']} |")
    print(f"\nbatch {args.batch_size}, {args.num_workers} workers, {args.batches} timed batches, train transforms, "
          f"{args.texture} frames stored {args.stored}, {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
