"""Every corpus layout of docs/corpora.md, sharded with the command the page gives, on byte-faithful small
imitations of the files people download (no header, quotes in captions, CRLF, BOM, upper-case columns, NaN,
float32, ISO durations, integer ids, caption lists, per-clip timestamps). The commands are read from the
page, so page and code cannot drift."""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from tests.media import make_video
from tests.pipelines.conftest import make_jpeg

DOC = Path(__file__).resolve().parents[2] / "docs" / "corpora.md"
RUN = ["--local", "--num-cpus", "1", "--no-progress", "--log-level", "WARNING", "--frame-size", "32",
       "--num-frames", "2", "--image-size", "32"]


def doc_commands() -> dict[str, list[str]]:
    """``{section: argv}`` of each ``mplug2-data shard`` command under a ``## name`` heading."""
    out, section = {}, None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("mplug2-data shard") and section:
            out[section] = shlex.split(line)[1:]
    return out


def strict_json(data: bytes):
    return json.loads(data, parse_constant=lambda c: pytest.fail(f"{c} in a sample json"))


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every committed sample: ``{key: {field: bytes}}``."""
    got: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, field = m.name.partition(".")
                got.setdefault(key, {})[field] = tf.extractfile(m).read()
    return got


def sidecar(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


# ------------------------------------------------------------------------------------------- the files
def _serve_images(srv, names):
    for i, n in enumerate(names):
        srv.routes[f"/{n}"] = (200, {"Content-Type": "image/jpeg"}, make_jpeg(48, 40, seed=i))
    return [srv.url(f"/{n}") for n in names]


def build_cc3m(d: Path, srv) -> None:
    a, b = _serve_images(srv, ["a.jpg", "b.jpg"])
    # Real CC3M: no header, caption TAB url, bare quotes; here also CRLF and trailing blank lines.
    (d / "Train_GCC-training.tsv").write_bytes(
        f'a "quoted" word in a caption\t{a}\r\nsecond caption , with comma\t{b}\r\n\r\n'.encode())


def build_cc12m(d: Path, srv) -> None:
    a, b = _serve_images(srv, ["c.jpg", "d.jpg"])
    (d / "cc12m.tsv").write_bytes(f"{a}\t<PERSON> at the café \"Zürich\"\n{b}\tplain caption\n".encode())


def build_laion(d: Path, srv) -> None:
    a, b = _serve_images(srv, ["e.jpg", "f.jpg"])
    table = pa.table({
        "__index_level_0__": pa.array([7, 8, 9], pa.int64()),
        "URL": [a, b, srv.url("/missing.jpg")],
        "TEXT": ["a laion caption", "another", None],
        "WIDTH": pa.array([48, 48, 10], pa.int32()), "HEIGHT": pa.array([40, 40, 10], pa.int32()),
        "similarity": pa.array([0.31, 0.29, 0.1], pa.float32()),
        "punsafe": pa.array([float("nan"), 0.01, 0.5], pa.float64()),
        "LICENSE": ["?", "cc-by", "?"],
    })
    pq.write_table(table, d / "part-00000.parquet")


def build_webvid(d: Path, srv) -> None:
    for i in range(2):
        p = make_video(d / f"src{i}.mp4", seconds=1.0, fps=8, size=(48, 32))
        srv.routes[f"/{i}.mp4"] = (200, {"Content-Type": "video/mp4"}, p.read_bytes())
    rows = "".join(f'{1000 + i},{srv.url(f"/{i}.mp4")},PT00H00M0{i + 1}S,"004451_004500",'
                   f'"Clip {i}, with ""quotes"""\n' for i in range(2))
    (d / "results_2M_train.csv").write_text("\ufeffvideoid,contentUrl,duration,page_dir,name\n" + rows)


def _videos(folder: Path, names: list[str], seconds: float = 1.0) -> None:
    for n in names:
        make_video(folder / n, seconds=seconds, fps=8, size=(48, 32))


def build_msrvtt(d: Path, srv) -> None:
    _videos(d / "videos" / "all", ["video0.mp4", "video1.mp4"])
    entries = [{"caption": f"caption {j} of video {v}", "video": f"video{v}.mp4"} for v in (0, 1) for j in range(3)]
    (d / "msrvtt_train.json").write_text(json.dumps(entries))


def build_msrvtt_vdi(d: Path, srv) -> None:
    _videos(d / "videos" / "all", ["video0.mp4", "video1.mp4"])
    videos = [{"category": 9, "url": f"https://www.youtube.com/watch?v=x{v}", "video_id": f"video{v}",
               "start time": 137.72, "end time": 149.44, "split": "train", "id": v} for v in (0, 1)]
    sentences = [{"caption": f"sentence {s} of {v}", "video_id": f"video{v}", "sen_id": 10 * v + (2 - s)}
                 for v in (0, 1) for s in range(3)]
    (d / "train_val_videodatainfo.json").write_text(json.dumps({"info": {}, "videos": videos,
                                                                "sentences": sentences}))


def build_msrvtt_qa(d: Path, srv) -> None:
    _videos(d / "videos" / "all", ["video7010.mp4"])
    qa = [{"answer": "cook", "id": 0, "question": "what is the man doing?", "video_id": 7010},
          {"answer": "two", "id": 1, "question": "how many people are there?", "video_id": 7010}]
    (d / "train_qa.json").write_text(json.dumps(qa))


def build_msvd_qa(d: Path, srv) -> None:
    make_video(d / "videos" / "vid1.avi", seconds=1.0, fps=8, size=(48, 32), codec="mjpeg")
    (d / "train_qa.json").write_text(json.dumps([{"answer": "dog", "id": 0, "question": "who runs?", "video_id": 1}]))


def build_coco(d: Path, srv) -> None:
    img = d / "images" / "val2014"
    img.mkdir(parents=True)
    (img / "COCO_val2014_000000391895.jpg").write_bytes(make_jpeg(48, 40, seed=5))
    images = [{"filepath": "val2014", "sentids": [0, 1], "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
               "split": "test", "sentences": [{"tokens": ["a", "man"], "raw": "A man with a red helmet.", "imgid": 0,
                                               "sentid": 0},
                                              {"tokens": ["a"], "raw": "A man riding a bike.", "imgid": 0,
                                               "sentid": 1}], "cocoid": 391895}]
    (d / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def build_refcoco(d: Path, srv) -> None:
    img = d / "images"
    img.mkdir()
    (img / "COCO_train2014_000000580957.jpg").write_bytes(make_jpeg(48, 40, seed=6))
    refs = [{"image": "COCO_train2014_000000580957.jpg", "sentence": "left man", "bbox": [6, 4, 24, 12],
             "ref_id": 0, "split": "val"},
            {"image": "COCO_train2014_000000580957.jpg", "sentence": "the rest", "bbox": [40, 4, -3, 12],
             "ref_id": 1, "split": "val"}]
    (d / "refcoco_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))


def build_activitynet(d: Path, srv) -> None:
    _videos(d / "videos", ["v_QOlSCBRmfWY.mp4"], seconds=3.0)
    (d / "train.json").write_text(json.dumps({"v_QOlSCBRmfWY": {
        "duration": 3.0, "timestamps": [[0.2, 1.4], [1.1, 2.8]],
        "sentences": ["A woman stands in a kitchen.", " She cuts a lemon.  "]}}))


def build_howto100m(d: Path, srv) -> None:
    _videos(d / "videos", ["-0Ht4yDpmjs.mp4"], seconds=3.0)
    (d / "caption.json").write_text(json.dumps({"-0Ht4yDpmjs": {
        "start": [0.0, 1.5], "end": [1.5, 2.9], "text": ["so today we make", "bread with flour"]}}))


# ------------------------------------------------------------------------------------------- the checks
def check_cc3m(s, rows):
    assert sorted(v["txt"].decode() for v in s.values()) == ['a "quoted" word in a caption',
                                                             "second caption , with comma"]


def check_cc12m(s, rows):
    assert sorted(v["txt"].decode() for v in s.values()) == ['<PERSON> at the café "Zürich"', "plain caption"]


def check_laion(s, rows):
    metas = sorted((strict_json(v["json"]) for v in s.values()), key=lambda m: m["source_index"])
    assert [m["punsafe"] for m in metas] == [None, 0.01]
    assert metas[0]["WIDTH"] == 48 and metas[0]["LICENSE"] == "?" and "__index_level_0__" not in metas[0]
    assert abs(metas[0]["similarity"] - 0.31) < 1e-6
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["error_reason"] for r in failed] == ["empty_caption"]
    assert failed[0]["url"].endswith("/missing.jpg") and failed[0]["LICENSE"] == "?" and failed[0]["WIDTH"] == 10
    table = pq.read_table(sorted(Path(".").glob("shards/laion/*.parquet"))[0])
    assert table.schema.field("similarity").type == pa.float32()


def check_webvid(s, rows):
    metas = sorted((strict_json(v["json"]) for v in s.values()), key=lambda m: m["source_index"])
    assert [m["videoid"] for m in metas] == ["1000", "1001"] and metas[0]["page_dir"] == "004451_004500"
    assert sorted(v["txt"].decode() for v in s.values()) == ['Clip 0, with "quotes"', 'Clip 1, with "quotes"']
    assert all(isinstance(m["duration"], float) for m in metas)


def check_msrvtt(s, rows):
    assert len(s) == 2  # one sample per video, not per caption
    caps = sorted(strict_json(v["json"])["captions"] for v in s.values())
    assert caps == [[f"caption {j} of video {v}" for j in range(3)] for v in (0, 1)]


def check_msrvtt_vdi(s, rows):
    metas = sorted((strict_json(v["json"]) for v in s.values()), key=lambda m: m["url"])
    assert [m["url"] for m in metas] == ["video0.mp4", "video1.mp4"]
    assert metas[0]["captions"] == ["sentence 2 of 0", "sentence 1 of 0", "sentence 0 of 0"]  # by sen_id
    assert metas[1]["youtube_url"].endswith("x1") and metas[1]["category"] == 9 and metas[1]["split"] == "train"


def check_msrvtt_qa(s, rows):
    metas = sorted((strict_json(v["json"]) for v in s.values()), key=lambda m: m["id"])
    assert [m["answer"] for m in metas] == ["cook", "two"] and metas[0]["url"] == "video7010.mp4"
    assert sorted(v["txt"].decode() for v in s.values())[0] == "how many people are there?"


def check_msvd_qa(s, rows):
    (meta,) = [strict_json(v["json"]) for v in s.values()]
    assert meta["url"] == "vid1.avi" and meta["answer"] == "dog"


def check_coco(s, rows):
    (meta,) = [strict_json(v["json"]) for v in s.values()]
    assert meta["captions"] == ["A man with a red helmet.", "A man riding a bike."] and meta["cocoid"] == 391895
    assert meta["split"] == "test" and meta["url"] == "val2014/COCO_val2014_000000391895.jpg"


def check_refcoco(s, rows):
    (sample,) = s.values()
    meta = strict_json(sample["json"])
    # border resize 48x40 -> 32x27, padded 2 px above: the box is scaled by 2/3 (x) and 27/40 (y), shifted 2 px
    assert sample["txt"] == b"left man" and meta["box"] == [4.0, 4.7, 16.0, 8.1] and meta["ref_id"] == 0
    (bad,) = [r for r in rows if r["status"] == "failed"]
    assert bad["error_reason"] == "invalid_input" and "non-positive width" in bad["error_message"]


def _check_clips(s, texts):
    assert sorted(s) == ["000000_000000_000", "000000_000000_001"]
    assert [s[k]["txt"].decode() for k in sorted(s)] == texts  # each clip its own sentence
    metas = [strict_json(s[k]["json"]) for k in sorted(s)]
    assert [m["clip_index"] for m in metas] == [0, 1]
    return metas


def check_activitynet(s, rows):
    metas = _check_clips(s, ["A woman stands in a kitchen.", "She cuts a lemon."])
    assert metas[1]["clip_start"] == 1.1 and metas[0]["annotated_duration"] == 3.0


def check_howto100m(s, rows):
    metas = _check_clips(s, ["so today we make", "bread with flour"])
    assert metas[0]["url"] == "-0Ht4yDpmjs.mp4" and metas[1]["clip_start"] == 1.5


LAYOUTS = {
    "cc3m": (build_cc3m, check_cc3m), "cc12m": (build_cc12m, check_cc12m), "laion": (build_laion, check_laion),
    "webvid": (build_webvid, check_webvid), "msrvtt": (build_msrvtt, check_msrvtt),
    "msrvtt-videodatainfo": (build_msrvtt_vdi, check_msrvtt_vdi), "msrvtt-qa": (build_msrvtt_qa, check_msrvtt_qa),
    "msvd-qa": (build_msvd_qa, check_msvd_qa), "coco": (build_coco, check_coco),
    "refcoco": (build_refcoco, check_refcoco),
    "activitynet": (build_activitynet, check_activitynet), "howto100m": (build_howto100m, check_howto100m),
}


def test_every_preset_has_a_documented_command():
    from pipelines.config import PRESETS

    assert set(doc_commands()) == set(LAYOUTS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_documented_command_shards_the_layout(name, tmp_path, monkeypatch, http_server, capsys):
    build, check = LAYOUTS[name]
    build(tmp_path, http_server)
    monkeypatch.chdir(tmp_path)
    argv = doc_commands()[name]
    code = main(argv + RUN)
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    out = tmp_path / argv[argv.index("--output") + 1]
    got = samples(out)
    assert got, printed.out
    for v in got.values():
        strict_json(v["json"])
    check(got, sidecar(out))
    assert re.search(r"samples\s+\d+ attempted", printed.out)


def test_table_quirks_beyond_the_fixtures(tmp_path):
    """The class of file, not only the fixtures: a header line after all, BOM + CRLF csv, ISO durations, a
    column that would shadow a contract field named with the flag that fixes it, ids without a template."""
    from pipelines.config import PreprocessConfig
    from pipelines.errors import ConfigError, SampleError
    from pipelines.sources import iter_records, normalize_row, parse_time, resolve_columns

    (tmp_path / "h.tsv").write_text("caption\turl\ncap\thttp://x/a.jpg\n\n\n")
    assert list(iter_records(str(tmp_path / "h.tsv"), column_names=["caption", "url"])) == [
        {"caption": "cap", "url": "http://x/a.jpg"}]
    (tmp_path / "b.csv").write_bytes("\ufeffurl,caption\r\nhttp://x/a.jpg,\"multi\r\nline\"\r\n".encode())
    assert list(iter_records(str(tmp_path / "b.csv"))) == [{"url": "http://x/a.jpg", "caption": "multi\r\nline"}]
    assert (parse_time("PT00H01M05S"), parse_time("PT1.5S"), parse_time("P1DT0H0M1S")) == (65.0, 1.5, 86401.0)
    cfg = PreprocessConfig(url_col="contentUrl", caption_col="name", modality="video")
    with pytest.raises(ConfigError, match="--drop-cols duration"):
        resolve_columns(["videoid", "contentUrl", "duration", "page_dir", "name"], cfg)
    with pytest.raises(ConfigError, match="--column-names .*--preset cc3m"):
        resolve_columns(["a caption", "http://x/a.jpg"], PreprocessConfig())
    cm = resolve_columns(["video_id", "question"], PreprocessConfig(url_col="video_id", caption_col="question"))
    with pytest.raises(SampleError, match="--media-template"):
        normalize_row({"video_id": 7010, "question": "q"}, cm, "video")
