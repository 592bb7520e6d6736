"""Loader-only throughput (samples/s): image (T=1) and video (8 frames) shards at tiny (32 px) and base (224 px)
resolution, read from a local folder and from S3 (an embedded SeaweedFS on 127.0.0.1).

    .venv/bin/python bench/bench_loader.py                      # full table
    .venv/bin/python bench/bench_loader.py --where local --res 224 --batches 20

Shards are written once per run to a scratch folder (stored frames are 1.15 x res, as a resize-to-256 writer
would leave them for 224 training). Timing starts after the first batch (worker start-up excluded; reported
separately) and covers decode, train transforms (RandomResizedCrop + flip + RandAugment), tokenisation and
collation.
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

from mplug2.data.loader import LoaderConfig, build_loader  # noqa: E402
from tests.data.shards_fixture import write_shards  # noqa: E402


def run_case(prefix: str, *, frames: int, res: int, batch_size: int, batches: int, num_workers: int) -> dict:
    cfg = LoaderConfig(prefix=prefix, corpus="bench", batch_size=batch_size, num_workers=num_workers, res=res,
                       num_frames=max(1, frames), shuffle_buffer=256)
    loader = build_loader(cfg)
    t0 = time.perf_counter()
    next(loader)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t1
    loader.close()
    return {"startup_s": round(startup, 2), "samples_per_s": round(batches * batch_size / dt, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--where", default="local,s3", help="comma list of local,s3")
    ap.add_argument("--modality", default="image,video", help="comma list of image,video")
    ap.add_argument("--res", default="32,224", help="comma list of training resolutions")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per case")
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
                stored = int(round(res * 1.15))
                for loc in where:
                    prefix = (f"s3://bench/{modality}-{res}" if loc == "s3" else str(scratch / f"{modality}-{res}"))
                    t0 = time.perf_counter()
                    write_shards(prefix, [args.samples_per_shard] * args.shards, frames=frames, size=(stored, stored))
                    write_s = time.perf_counter() - t0
                    need = (args.batches + 1) * args.batch_size
                    if need > args.shards * args.samples_per_shard:
                        raise SystemExit(f"need {need} samples: raise --shards or --samples-per-shard")
                    r = run_case(prefix, frames=frames, res=res, batch_size=args.batch_size, batches=args.batches,
                                 num_workers=args.num_workers)
                    row = {"modality": modality, "T": max(1, frames), "res": res, "where": loc, **r,
                           "frames_per_s": round(r["samples_per_s"] * max(1, frames), 1), "write_s": round(write_s, 1)}
                    rows.append(row)
                    print(f"{modality:5s} T={row['T']} res={res:3d} {loc:5s}  {row['samples_per_s']:8.1f} samples/s  "
                          f"({row['frames_per_s']:.0f} frames/s, start-up {row['startup_s']}s)", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n| modality | T | res | storage | samples/s | frames/s | first batch (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['modality']} | {r['T']} | {r['res']} | {r['where']} | {r['samples_per_s']} | {r['frames_per_s']} "
              f"| {r['startup_s']} |")
    print(f"\nbatch {args.batch_size}, {args.num_workers} workers, {args.batches} timed batches, train transforms, "
          f"{os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
