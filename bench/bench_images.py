"""Image-corpus benchmark: mplug2-ray's shard pipeline vs img2dataset 1.47.0, back to back.

    .venv/bin/python -m bench.bench_images            # 10,000 images, both tools, prints a table
    .venv/bin/python -m bench.bench_images --n 2000 --skip-img2dataset --executors ray
    .venv/bin/python -m bench.bench_images --executors ray-cluster,ray,local   # issue 11: the Ray Data path

Same setup as data-contract §16: synthetic JPEGs (320-800 x 240-600, ~61 KB) served by nginx on
127.0.0.1 (1 worker, backlog 4096), 256 px ``border`` resize, JPEG q95, 2 processes x 32 threads,
1,000 samples per shard. Wall time counts everything a user waits for (Ray start-up included); CPU
seconds count every process of a run, Ray's included (:mod:`bench.proc_cpu`), and vary less with load.
Everything large lives under ``bench/.cache/`` (git-ignored by a ``.gitignore`` written there):
the corpus, img2dataset's own venv, nginx's config/logs and both outputs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import proc_cpu

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
I2D_VERSION = "1.47.0"


def ensure_cache() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    gi = CACHE / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")
    return CACHE


# ---------------------------------------------------------------------------------------------- corpus
def _make_one(args: tuple[int, str]) -> int:
    import numpy as np
    from PIL import Image

    i, folder = args
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(320, 801)), int(rng.integers(240, 601))
    # A coarse random pattern upscaled: photo-like spectra, ~61 KB at q90 over this size range.
    base = (rng.random((max(2, h // 10), max(2, w // 10), 3)) * 255).astype("uint8")
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    Path(folder, f"{i:06d}.jpg").write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_corpus(n: int, folder: Path, workers: int = 2) -> dict:
    """Write ``n`` JPEGs (reused when already there) and return size stats."""
    marker = folder / f".done-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        t0 = time.monotonic()
        with ProcessPoolExecutor(workers) as ex:
            sizes = list(ex.map(_make_one, [(i, str(folder)) for i in range(n)], chunksize=64))
        marker.write_text(json.dumps({"n": n, "mean_bytes": sum(sizes) / n}))
        print(f"corpus: {n} JPEGs in {time.monotonic() - t0:.0f}s, mean {sum(sizes) / n / 1024:.1f} KiB")
    return json.loads(marker.read_text())


def write_manifest(n: int, port: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/{i:06d}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"synthetic image {i}" for i in range(n)]}), path)


# ---------------------------------------------------------------------------------------------- nginx
def ensure_nginx() -> str:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("nginx is not installed and cannot be installed here (needs root + apt-get): "
                 "install it with `apt-get install -y nginx` and re-run")
    print("installing nginx with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "nginx"], env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "nginx"], env=env, check=True, capture_output=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx on 127.0.0.1 with 1 worker and backlog 4096 (the §16 setup), stopped by PID."""

    def __init__(self, root: Path, port: int, work: Path):
        self.root, self.port, self.work = root, port, work
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = ensure_nginx()
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {self.work}/nginx.pid;
error_log {self.work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  types {{ image/jpeg jpg; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    root {self.root};
  }}
}}
""")
        self.proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(self.work)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/000000.jpg", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"nginx exited: see {self.work}/error.log")
                time.sleep(0.1)
        sys.exit("nginx did not answer on 127.0.0.1:%d" % self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- runners
def ensure_img2dataset() -> Path:
    venv = CACHE / "i2d-venv"
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"installing img2dataset=={I2D_VERSION} into {venv} ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


def run_img2dataset(manifest: Path, out: Path, args, keep: set[int]) -> dict:
    exe = ensure_img2dataset()
    shutil.rmtree(out, ignore_errors=True)
    # the venv's python runs the script: its shebang names the folder the venv was made in, which may be gone
    cmd = [str(exe.parent / "python"), str(exe), "--url_list", str(manifest), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_folder", str(out), "--output_format", "webdataset",
           "--image_size", str(args.size), "--resize_mode", "border", "--encode_quality", "95",
           "--processes_count", str(args.processes), "--thread_count", str(args.threads),
           "--number_sample_per_shard", str(args.shard_size), "--distributor", "multiprocessing",
           "--enable_wandb", "False", "--timeout", "10", "--retries", "0"]
    cpu0, t0 = proc_cpu.children_cpu_s(), time.monotonic()
    with proc_cpu.CpuSampler(skip=keep) as sampler:
        res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    proc_cpu.reap_orphans(keep)
    if res.returncode != 0:
        sys.exit(f"img2dataset failed:\n{res.stderr[-3000:]}")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return {"tool": f"img2dataset {I2D_VERSION}", "wall_s": wall, "images": ok,
            "cpu_s": proc_cpu.children_cpu_s() - cpu0, "cpu_by_process": sampler.by_label()}


# The ray-cluster case: Ray up in the driver process before the clock, as in a notebook or a `ray job` on a
# long-lived cluster. Such a cluster has run Ray Data before, so Ray Data's own actors (statistics,
# autoscaling coordinator: each a worker process that imports Ray, ~1.5 CPU-s) already exist; a two-row
# Ray Data job before the clock creates them. Our modules are not imported in the workers beforehand.
# The benchmark says "go" on stdin and times `mplug2-data shard` alone; the driver then waits for a line
# before it shuts Ray down, so the CPU of the run is read while every process of it is still there.
_RAY_CLUSTER_DRIVER = """
import json, sys, time
from mplug2.runtime import init_ray
init_ray(num_cpus={cpus}, include_dashboard=False)
import ray, ray.data
ray.get([ray.remote(lambda: 0).remote() for _ in range({cpus})])
ray.data.range(2, override_num_blocks=2).map(lambda r: r).materialize()
from pipelines.cli import main
print("ready", flush=True)
sys.stdin.readline()
t0, epoch0 = time.monotonic(), time.time()
rc = main(sys.argv[1:])
print(json.dumps({{"wall_s": time.monotonic() - t0}}), flush=True)
sys.stdin.readline()
# after the clock and the CPU count: where the run's shard tasks ran (Ray's task events), for idle_core_s
tasks = [(e["tid"], e["ts"] / 1e6 - epoch0, e["dur"] / 1e6) for e in ray.timeline()
         if e.get("ph") == "X" and e.get("name", "").endswith("map_operator._map_task") and e["ts"] / 1e6 >= epoch0]
print(json.dumps({{"tasks": tasks}}), flush=True)
sys.exit(rc)
"""


def idle_core_s(tasks: list[tuple[str, float, float]], slots: int, wall_s: float) -> dict:
    """Where the run's CPU slots stood idle, from its shard tasks as (worker, start, seconds) after the
    clock's start: before a slot's first task, between its tasks, after its last. One worker process is
    one slot here (one task per shard, 1 CPU each: Ray reuses the same workers); slots no task ran on
    count as idle throughout (``start``)."""
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for worker, start, dur in tasks:
        by_worker.setdefault(worker, []).append((start, start + dur))
    runs = sorted(by_worker.values(), key=lambda r: min(r))[:slots]
    out = {"first_task_s": [round(min(r)[0], 2) for r in runs], "start": 0.0, "between": 0.0, "tail": 0.0}
    for r in runs:
        r.sort()
        out["start"] += r[0][0]
        out["between"] += sum(max(0.0, b[0] - a[1]) for a, b in zip(r, r[1:]))
        out["tail"] += max(0.0, wall_s - r[-1][1])
    out["start"] += wall_s * (slots - len(runs))
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def run_ours(manifest: Path, out: Path, args, executor: str, keep: set[int]) -> dict:
    """``executor``: ray / local / auto as `mplug2-data shard --executor`, or ray-cluster: the Ray Data path
    on a running Ray (:data:`_RAY_CLUSTER_DRIVER`), timing only the run. ``keep``: our own children that
    are not part of the run (nginx)."""
    shutil.rmtree(out, ignore_errors=True)
    venv_py = REPO / ".venv" / "bin" / "python"
    cmd = [str(venv_py if venv_py.exists() else sys.executable), "-m", "pipelines.cli", "shard", "--manifest", str(manifest),
           "--output", str(out), "--samples-per-shard", str(args.shard_size), "--threads", str(args.threads),
           "--image-size", str(args.size), "--resize-mode", "border", "--jpeg-quality", "95", "--mode", "overwrite",
           "--num-cpus", str(args.processes), "--retries", "0", "--no-progress", "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="raybench", dir="/tmp")  # never join another cluster
    if executor == "ray-cluster":
        driver = _RAY_CLUSTER_DRIVER.format(cpus=args.processes)
        cmd = [cmd[0], "-c", driver] + cmd[3:] + ["--executor", "ray"] + args.ours_args.split()
    else:
        cmd += ["--executor", executor] + args.ours_args.split()
    cpu0, timed = proc_cpu.children_cpu_s(), None
    with tempfile.TemporaryFile("w+") as err:
        try:
            with proc_cpu.CpuSampler(skip=keep) as sampler:
                t0 = time.monotonic()
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                        cwd=REPO, env=env)
                if executor == "ray-cluster" and proc.stdout.readline().strip() == "ready":
                    sampler.start_clock()  # Ray is up and warm: from here on the run counts
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    for line in proc.stdout:  # the run's summary table, then the driver's timing
                        if line.startswith('{"wall_s"'):
                            timed = line
                            break
                    sampler.stop()  # the run is over, its processes still there
                    proc.stdin.write("exit\n")
                    proc.stdin.flush()
                stdout, _ = proc.communicate()
                wall = time.monotonic() - t0
            proc_cpu.reap_orphans(keep)
        finally:
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        sys.exit(f"mplug2-data failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    idle = None
    if executor == "ray-cluster":
        if timed is None:
            sys.exit(f"the ray-cluster driver printed no timing:\n{stdout[-2000:]}\n{stderr[-3000:]}")
        wall = json.loads(timed)["wall_s"]
        tasks = next((json.loads(ln)["tasks"] for ln in stdout.splitlines() if ln.startswith('{"tasks"')), None)
        idle = idle_core_s(tasks, args.processes, wall) if tasks else None
    # Ray's processes escape RUSAGE_CHILDREN (see bench.proc_cpu): sample those runs, count the others exactly
    cpu = sampler.total_s() if executor.startswith("ray") else proc_cpu.children_cpu_s() - cpu0
    ds = json.loads((out / "dataset.json").read_text())
    return {"tool": f"mplug2-ray ({executor})", "wall_s": wall, "images": ds["num_samples"],
            "cpu_s": cpu, "cpu_by_process": sampler.by_label(), "idle_core_s": idle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_images", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="images in the corpus")
    p.add_argument("--threads", type=int, default=32, help="download threads per process / shard task")
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes = our Ray CPUs")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--port", type=int, default=18089)
    p.add_argument("--executors", default="ray-cluster,ray,local",
                   help="our executors to run, comma-separated: ray-cluster (the Ray Data stages on a Ray of "
                        "--processes CPUs already running in the driver process, started before the clock), ray "
                        "(the same, Ray started by the run and its start-up counted), local (process pool, no Ray) and/or auto "
                        "(the default of `mplug2-data shard`: local here; RAY_ADDRESS is removed)")
    p.add_argument("--ours-args", default="", help="extra flags for `mplug2-data shard` (e.g. '--task-cpus 0.5')")
    p.add_argument("--skip-img2dataset", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--order", choices=("i2d-first", "ours-first"), default="i2d-first")
    p.add_argument("--cpu-detail", action="store_true", help="also print each run's CPU seconds by process")
    args = p.parse_args(argv)
    if not proc_cpu.become_subreaper():
        print("note: not Linux, CPU-s per run not measured exactly", file=sys.stderr)

    cache = ensure_cache()
    corpus = cache / f"images-{args.n}"
    info = make_corpus(args.n, corpus)
    manifest = cache / f"urls-{args.n}.parquet"
    write_manifest(args.n, args.port, manifest)
    load_before = os.getloadavg()
    server = Nginx(corpus, args.port, cache / "nginx")
    server.start()
    results = []
    try:
        runners = [] if args.skip_img2dataset else [("i2d", None, cache / "out-img2dataset")]
        if not args.skip_ours:
            runners += [("ours", ex, cache / f"out-mplug2-{ex}") for ex in args.executors.split(",") if ex]
        if args.order == "ours-first":
            runners.reverse()
        for name, executor, out in runners:
            keep = {server.proc.pid}
            r = (run_img2dataset(manifest, out, args, keep) if name == "i2d"
                 else run_ours(manifest, out, args, executor, keep))
            results.append(r)
            print(f"{r['tool']}: {r['images']} images in {r['wall_s']:.1f}s, {r['cpu_s']:.1f} CPU-s", flush=True)
            if r.get("idle_core_s"):
                i = r["idle_core_s"]
                print(f"    first shard task at {', '.join(f'{t:.2f}' for t in i['first_task_s'])} s; idle core-s of "
                      f"{args.processes} slots: {i['start']:.2f} before the first task, {i['between']:.2f} between "
                      f"tasks, {i['tail']:.2f} after the last", flush=True)
            if args.cpu_detail:
                for label, (n, cpu) in r["cpu_by_process"].items():
                    if cpu >= 0.05:
                        print(f"    {label[:44]:<44}{n:>4} proc{cpu:>8.1f} CPU-s")
    finally:
        server.stop()
    base = next((r for r in results if r["tool"].startswith("img2dataset")), None)
    print(f"\n{args.n} images (mean {info['mean_bytes'] / 1024:.1f} KiB), {args.size}px border q95, "
          f"{args.processes} procs x {args.threads} threads, {args.shard_size}/shard; "
          f"load avg before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    local = next((r for r in results if r["tool"] in ("mplug2-ray (local)", "mplug2-ray (auto)")), None)
    print(f"{'tool':<26}{'wall s':>8}{'images':>8}{'images/s':>10}{'vs i2d':>8}{'vs local':>9}{'CPU-s':>8}"
          f"{'img/CPU-s':>10}")
    for r in results:
        ips = r["images"] / r["wall_s"]
        ratio = ips / (base["images"] / base["wall_s"]) if base else float("nan")
        vs_local = ips / (local["images"] / local["wall_s"]) if local else float("nan")
        r.update(images_per_s=ips, ratio=ratio, ratio_vs_local=vs_local)
        print(f"{r['tool']:<26}{r['wall_s']:>8.1f}{r['images']:>8}{ips:>10.0f}{ratio:>8.2f}{vs_local:>9.2f}"
              f"{r['cpu_s']:>8.1f}{r['images'] / max(r['cpu_s'], 1e-9):>10.0f}")
    print("wall: what a user waits for (ray-cluster: the run alone, Ray up and warm); CPU-s: every process of "
          "the run, Ray's included (ray-cluster: from the clock's start)")
    results_dir = REPO / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "bench_images.json").write_text(json.dumps({"args": vars(args), "load_before": load_before,
                                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
