"""Peak memory of ``mplug2-model import-official`` on a Large-shaped release checkpoint (random fp16 values).

Writes the release's layout at Large (2223 keys for caption, 4446 for QA; ``tests/official_layout.py``) to a temp
folder, imports it in a fresh process (``mplug2-model import-official``), and reports that process's peak RSS
(its own ``VmHWM``, read at exit: a child's ``ru_maxrss`` would inherit the writer's high-water mark across exec)
against the file's size; the bound is 1.3x the size on disk. The files are deleted
afterwards. Caption is ~3 GB, QA ~6 GB of disk; writing one needs about its size in memory for a moment.

    python -m bench official [--task caption|qa] [--dtype float16|float32] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mplug2.config import MPLUG2Config  # noqa: E402
from tests.official_layout import CLIP_TEXT_LARGE, release_layout, release_state_dict  # noqa: E402

BOUND = 1.3
# The import, then this process's own peak resident set (kB) from /proc (VmHWM starts at 0 at exec).
_CHILD = ("import sys; from mplug2.cli import main; rc = main(sys.argv[1:]); "
          "print('VmHWM_KB=' + open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)")


def write_release_file(path: Path, task: str, dtype: torch.dtype) -> int:
    layout = release_layout(MPLUG2Config.preset("large"), task, fusion_allocated=24, clip_text=CLIP_TEXT_LARGE)
    sd = release_state_dict(layout, dtype)
    torch.save({"model": sd, "epoch": 0}, path)
    del sd
    return path.stat().st_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["caption", "qa"], default="caption")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--dir", default=None, help="where to write the temporary checkpoint (default: $TMPDIR)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mplug2-bench-official-", dir=args.dir))
    try:
        ckpt = tmp / f"mplug2_{args.task}.pth"
        t0 = time.perf_counter()
        size = write_release_file(ckpt, args.task, getattr(torch, args.dtype))
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, "import-official", str(ckpt), "--task", args.task,
                               "--out", str(tmp / "out")], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        peak = int(proc.stdout.rsplit("VmHWM_KB=", 1)[1].split()[0]) * 1024
        out_size = (tmp / "out" / "model.safetensors").stat().st_size
        ratio = peak / size
        print(f"| task | dtype | file on disk | output model.safetensors | peak RSS (import) | RSS / file | bound | "
              f"import wall | file write |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.task} | {args.dtype} | {size / 2**30:.2f} GiB | {out_size / 2**30:.2f} GiB | "
              f"{peak / 2**30:.2f} GiB | {ratio:.2f} | {BOUND} | {wall:.1f} s | {t_write:.1f} s |")
        print(f"load: {os.getloadavg()[0]:.1f} (1-min) on {os.cpu_count()} CPUs")
        return 0 if ratio <= BOUND else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
