"""Manifest formats, discovery order, column mapping and row validation (data-contract §2)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import PreprocessConfig
from pipelines.errors import ConfigError, SampleError
from pipelines.sources import (check_manifests, expand_manifests, iter_records, iter_rows, normalize_row,
                               parse_time, resolve_columns)

ROWS = [{"url": f"http://x/{i}.jpg", "caption": f"cap {i}", "punsafe": i / 10} for i in range(5)]


def _write_all_formats(d):
    pq.write_table(pa.Table.from_pylist(ROWS), d / "a.parquet", row_group_size=2)
    (d / "b.csv").write_text("url,caption,punsafe\n" + "".join(f'{r["url"]},"{r["caption"]}, quoted",{r["punsafe"]}\n'
                                                                for r in ROWS))
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    (d / "d.json").write_text(json.dumps(ROWS))
    (d / "e.tsv").write_text("".join(f'{r["caption"]} with "quotes"\t{r["url"]}\n' for r in ROWS))


def test_every_format_streams_the_same_rows(tmp_path):
    _write_all_formats(tmp_path)
    assert [r["url"] for r in iter_records(str(tmp_path / "a.parquet"), batch_rows=2)] == [r["url"] for r in ROWS]
    csv_rows = list(iter_records(str(tmp_path / "b.csv")))
    assert csv_rows[1] == {"url": "http://x/1.jpg", "caption": "cap 1, quoted", "punsafe": "0.1"}
    assert list(iter_records(str(tmp_path / "c.jsonl.gz"))) == ROWS
    assert list(iter_records(str(tmp_path / "d.json"))) == ROWS
    # header-less CC3M-style tsv with bare quotes in captions
    tsv = list(iter_records(str(tmp_path / "e.tsv"), column_names=["caption", "url"]))
    assert tsv[0] == {"caption": 'cap 0 with "quotes"', "url": "http://x/0.jpg"}


def test_folder_and_glob_are_read_in_sorted_order(tmp_path):
    _write_all_formats(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    files = expand_manifests([str(tmp_path)])
    assert [p.rsplit("/", 1)[1] for p in files] == ["a.parquet", "b.csv", "c.jsonl.gz", "d.json", "e.tsv"]
    assert expand_manifests([str(tmp_path / "*.json*")]) == [str(tmp_path / "c.jsonl.gz"), str(tmp_path / "d.json")]
    with pytest.raises(ConfigError, match="not found"):
        expand_manifests([str(tmp_path / "nope.parquet")])


def test_s3_manifest_is_read_through_s3fs(s3_bucket, tmp_path):
    from mplug2 import storage

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    storage.atomic_write(f"{s3_bucket}/m/part-1.parquet", buf.getvalue().to_pybytes())
    storage.atomic_write(f"{s3_bucket}/m/part-0.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode())
    files = expand_manifests([f"{s3_bucket}/m/"])
    assert files == [f"{s3_bucket}/m/part-0.jsonl", f"{s3_bucket}/m/part-1.parquet"]
    cfg = PreprocessConfig(manifest=files, output=str(tmp_path))
    rows = list(iter_rows(files, cfg))
    assert [(r.source_index, r.values["url"]) for r in rows][:3] == [(0, ROWS[0]["url"]), (1, ROWS[1]["url"]),
                                                                   (0, ROWS[0]["url"])]
    assert len(rows) == 7


def test_missing_or_colliding_columns_fail_at_startup(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"link": "x", "caption": "c"}) + "\n")
    with pytest.raises(ConfigError, match="media column 'url' not found"):
        check_manifests([str(p)], PreprocessConfig(manifest=[str(p)], output="o"))
    p.write_text(json.dumps({"url": "x", "text": "c"}) + "\n")
    with pytest.raises(ConfigError, match="caption column"):
        check_manifests([str(p)], PreprocessConfig(manifest=[str(p)], output="o"))
    p.write_text(json.dumps({"url": "x", "caption": "c", "sha256": "abc"}) + "\n")
    with pytest.raises(ConfigError, match=r"sha256.*collide"):
        check_manifests([str(p)], PreprocessConfig(manifest=[str(p)], output="o"))


def test_aliases_and_presets():
    cfg = PreprocessConfig(manifest=["m"], output="o")
    assert resolve_columns(["path", "caption"], cfg).url == "path"
    webvid = PreprocessConfig(manifest=["m"], output="o", preset="webvid")
    cm = resolve_columns(["videoid", "contentUrl", "duration", "page_dir", "name"], webvid)
    assert (cm.url, cm.captions, webvid.modality) == ("contentUrl", ("name",), "video")
    item = normalize_row({"videoid": 7, "contentUrl": "u", "duration": "PT00H00M11S", "page_dir": "p", "name": "n"},
                         cm, "video")
    assert item.extras == {"videoid": 7, "page_dir": "p"}  # duration dropped: it would collide
    msrvtt = PreprocessConfig(manifest=["m"], output="o", preset="msrvtt")
    cm = resolve_columns(["video_id", "sentences"], msrvtt)
    item = normalize_row({"video_id": "v1.mp4", "sentences": ["a dog runs", " a dog "]}, cm, "video")
    assert item.captions == ["a dog runs", "a dog"]
    coco = PreprocessConfig(manifest=["m"], output="o", preset="coco", url_col="file")
    assert coco.url_col == "file"  # explicit flags win over the preset


def test_row_validation_reasons():
    cm = resolve_columns(["url", "caption", "start", "end", "label"],
                         PreprocessConfig(manifest=["m"], output="o", start_col="start", end_col="end",
                                          label_col="label"))

    def reason(row, modality="video"):
        with pytest.raises(SampleError) as ei:
            normalize_row({"url": "u", "caption": "c", "start": 0, "end": 1, "label": 3, **row}, cm, modality)
        return ei.value.reason

    assert reason({"url": ""}) == "invalid_input"
    assert reason({"caption": 5}) == "invalid_input"
    assert reason({"caption": "  "}) == "empty_caption"
    assert reason({"start": 2, "end": 1}) == "invalid_input"
    assert reason({"start": -1}) == "invalid_input"
    assert reason({"end": "soon"}) == "invalid_input"
    assert reason({"label": "cat"}) == "invalid_input"
    ok = normalize_row({"url": " u ", "caption": " c ", "start": "00:00:01.5", "end": "", "label": "3"}, cm, "video")
    assert (ok.url, ok.caption, ok.clips, ok.label) == ("u", "c", [(1.5, None)], 3)


def test_clips_column_and_time_parsing():
    cfg = PreprocessConfig(manifest=["m"], output="o", clips_col="clips", modality="video")
    cm = resolve_columns(["url", "caption", "clips"], cfg)
    item = normalize_row({"url": "u", "caption": "c", "clips": "[[0, 1.5], [\"00:02\", \"00:00:03.25\"]]"}, cm, "video")
    assert item.clips == [(0.0, 1.5), (2.0, 3.25)]
    assert parse_time("01:02:03.5") == 3723.5 and parse_time(4) == 4.0 and parse_time("") is None
    with pytest.raises(SampleError):
        normalize_row({"url": "u", "caption": "c", "clips": [[1, 0]]}, cm, "video")
