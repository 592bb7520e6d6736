"""Run a benchmark by name: ``python -m bench <name> [args...]`` (``python -m bench`` lists them).

| name | what it measures |
|---|---|
| images | preprocessing 10k images: this pipeline vs img2dataset 1.47 (nginx on loopback) |
| frames | 8-frame / 1-fps sampling: our PyAV and ffmpeg backends vs PyAV-naive, decord, torchcodec |
| model  | forward + backward time, peak memory (and MFU on a GPU) for tiny / base / large |
| loader | training loader samples/s and CPU ms per sample (PIL reference vs tensor path, augment_on cpu / device) |
| ckpt   | checkpoint steps vs other steps on the critical path (background uploads to S3) |
| interference | a training step's CPU beside memory copies / file writes on the other core (the floor of `ckpt`) |
| train  | loader alone vs training step; Ray Train step vs a plain torch.distributed loop |
| caption | captions/s through the inference API, with and without the KV cache (tiny on CPU; base/large on GPU) |
| official | peak RSS of `import-official` on a Large-shaped release checkpoint (bound: 1.3x its size) |
| infer | batch inference over shards: one shard task in process vs `python -m jobs.infer` on a local Ray |
| tests | wall time and CPU seconds (Ray and SeaweedFS included) of the slowest tests, one pytest process each |
| rerank | not a timing: what ITC and ITM each tell apart on held-out clips, R@1 under re-rank rules |

GPU figures of issue 13 at once: ``bash bench/gpu_all.sh`` (model MFU eager / compiled, loader with augment_on).
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {"images": "bench.bench_images", "frames": "bench.bench_frames", "model": "bench.bench_model",
           "loader": "bench.bench_loader", "train": "bench.bench_train", "ckpt": "bench.bench_ckpt",
           "interference": "bench.bench_interference",
           "official": "bench.bench_official", "caption": "bench.bench_caption", "infer": "bench.bench_infer",
           "tests": "bench.bench_tests", "rerank": "bench.bench_rerank"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHES[argv[0]])
    sys.argv = [f"python -m bench {argv[0]}", *argv[1:]]
    result = module.main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
