"""Checkpoint cost on the training's critical path: a tiny run on S3 (embedded SeaweedFS on 127.0.0.1) with a
checkpoint every few steps; per step, the wall time between consecutive step records of the run's metrics.jsonl
(a checkpoint's in-memory snapshot and hand-off to the background write + upload fall in the interval after
its step).

    python -m bench ckpt                      # tiny, 24 steps, a checkpoint every 3
    python -m bench ckpt --steps 40 --every 4 --preset tiny

Prints the median interval after checkpoint steps and after the other steps, their ratio (the target of
issue 13: within 10 %), the median snapshot time on the step, the median time a checkpoint's write + upload
took in the background, and the median wait for the previous checkpoint (``ckpt_wait_s``). The machine is
shared: the 1-minute load average is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mplug2.runtime import setup_process_env  # noqa: E402

setup_process_env()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--storage", choices=("s3", "local"), default="s3",
                    help="s3: SeaweedFS on 127.0.0.1 (its server shares this machine's CPUs); local: a folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mplug2 import storage
    from mplug2.s3server import S3Server
    from mplug2.train.config import TrainConfig
    from mplug2.train.loop import run_local
    from tests.data.shards_fixture import write_shards

    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    server = S3Server(root=scratch / "s3", buckets=("bench",))
    server.start()
    try:
        os.environ.update(server.env())
        shards = str(scratch / "images")
        write_shards(shards, [64] * 4, size=(40, 36))
        cfg = TrainConfig.from_dict(dict(
            run_name="ckpt", storage="s3://bench/runs" if args.storage == "s3" else str(scratch / "runs"), task="pretrain", seed=0,
            model={"preset": args.preset, "queue_size": 16, "tokenizer": "bert-base-uncased",
                   "text": {"vocab_size": 30522}},     # captions differ by digits, which tiny maps to [UNK]
            data=dict(train=[dict(name="images", path=shards, num_frames=1)], batch_size=args.batch_size,
                      shuffle_buffer=16, shards_in_flight=2, max_text_len=12),
            optim=dict(warmup_steps=1),
            schedule=dict(total_steps=args.steps, ckpt_every_steps=args.every, log_every_steps=1000, keep_last=2),
            scale=dict(num_workers=1)))
        t0 = time.perf_counter()
        run_local(cfg)
        wall = time.perf_counter() - t0
        raw = storage.read_bytes(storage.join(cfg.storage, "ckpt", "logs", "metrics.jsonl")).decode()
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    rows = sorted((json.loads(line) for line in raw.splitlines() if line.strip()), key=lambda r: r["step"])
    rows = [r for r in rows if "step_time_s" in r]
    after_ckpt, other, step_after_ckpt, step_other = [], [], [], []
    for prev, cur in zip(rows[1:], rows[2:]):         # skip the first interval (start-up, FLOP counting)
        ckpt = prev["step"] % args.every == 0
        (after_ckpt if ckpt else other).append(cur["time"] - prev["time"])
        (step_after_ckpt if ckpt else step_other).append(cur["step_time_s"])   # the training step alone
    def median_ms(key: str) -> float:       # over the records that follow a checkpoint (the key is 0 elsewhere)
        values = [r.get(key, 0.0) for r in rows if r["step"] > 1 and (r["step"] - 1) % args.every == 0]
        return 1000 * statistics.median(values) if values else 0.0

    med_c, med_o = statistics.median(after_ckpt), statistics.median(other)
    print("| storage | steps | every | median step, other (ms) | median step, checkpoint (ms) | ratio | snapshot (ms) | "
          "write + upload in the background (ms) | wait for the previous (ms) | train_step alone, other / after a "
          "checkpoint (ms) | run wall (s) | load (1 min) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.storage} | {args.steps} | {args.every} | {1000 * med_o:.0f} | {1000 * med_c:.0f} | {med_c / med_o:.2f} | "
          f"{median_ms('ckpt_snapshot_s'):.1f} | {median_ms('ckpt_background_s'):.0f} | "
          f"{median_ms('ckpt_wait_s'):.1f} | {1000 * statistics.median(step_other):.0f} / "
          f"{1000 * statistics.median(step_after_ckpt):.0f} | {wall:.1f} | {os.getloadavg()[0]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
