"""Every failure said plainly: the message, the exit code, nothing committed that should not be, committed
shards untouched (issue 12)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mplug2 import storage
from pipelines import shards
from pipelines.cli import main
from pipelines.config import PreprocessConfig
from pipelines.errors import (EXIT_BAD_INVOCATION, EXIT_INCOMPLETE, EXIT_OK, EXIT_STORAGE_UNAVAILABLE,
                              EXIT_TOO_MANY_FAILED)
from pipelines.run import RunSummary, preprocess
from tests.pipelines.conftest import make_jpeg

RUN = ["--local", "--num-cpus", "1", "--no-progress", "--log-level", "WARNING", "--image-size", "32"]
ROOT = Path(__file__).resolve().parents[2]


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        (folder / f"i{i}.jpg").write_bytes(make_jpeg(40, 32, seed=i))
        names.append(f"i{i}.jpg")
    return names


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Two committed one-image shards under a local folder, and their manifest (built once)."""
    d = tmp_path_factory.mktemp("small")
    names = _images(d / "media", 2)
    (d / "m.jsonl").write_text("".join(json.dumps({"url": f"media/{n}", "caption": f"c {n}"}) + "\n" for n in names))
    assert main(["shard", "--manifest", str(d / "m.jsonl"), "--output", str(d / "out"), "--samples-per-shard", "1",
                 *RUN]) == 0
    return d


# --------------------------------------------------------------------------------- every row failed
def test_wrong_column_order_fails_every_row_exits_1_and_commits_nothing(tmp_path, capsys):
    _images(tmp_path / "media", 2)
    (tmp_path / "cc.tsv").write_text("first caption\tmedia/i0.jpg\nsecond caption\tmedia/i1.jpg\n")
    code = main(["shard", "--manifest", str(tmp_path / "cc.tsv"), "--output", str(tmp_path / "out"),
                 "--column-names", "url,caption", *RUN])  # swapped: the caption is read as the media path
    out = capsys.readouterr().out
    assert code == EXIT_TOO_MANY_FAILED
    assert "EVERY ROW FAILED, nothing committed: mostly not_found (e.g. no such file:" in out
    assert "--column-names" in out and "2 attempted, 0 written, 2 failed" in out
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "dataset.json").exists()
    # the same file with the right column order works
    assert main(["shard", "--manifest", str(tmp_path / "cc.tsv"), "--output", str(tmp_path / "ok"),
                 "--column-names", "caption,url", *RUN]) == EXIT_OK


def test_missing_media_root_and_a_dead_first_shard(tmp_path, capsys):
    _images(tmp_path / "media", 2)
    man = tmp_path / "manifests" / "m.jsonl"
    man.parent.mkdir()
    man.write_text("".join(json.dumps({"url": n, "caption": "c"}) + "\n" for n in ("i0.jpg", "i1.jpg")))
    assert main(["shard", "--manifest", str(man), "--output", str(tmp_path / "out"), *RUN]) == EXIT_TOO_MANY_FAILED
    assert not list((tmp_path / "out").glob("*.tar"))
    capsys.readouterr()
    # Dead links in the first shard of a run that otherwise works: held back, then committed like any other.
    man.write_text("".join(json.dumps({"url": n, "caption": "c"}) + "\n" for n in ("gone0.jpg", "gone1.jpg",
                                                                                   "i0.jpg", "i1.jpg")))
    code = main(["shard", "--manifest", str(man), "--output", str(tmp_path / "out"), "--media-root",
                 str(tmp_path / "media"), "--samples-per-shard", "2", *RUN])
    assert code == EXIT_OK, capsys.readouterr().out
    ds = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [s["name"] for s in ds["shards"]] == ["train-000000.tar", "train-000001.tar"] and ds["num_samples"] == 2


# --------------------------------------------------------------------------------- storage
def test_output_bucket_that_does_not_exist_is_refused_not_created(s3_server, tmp_path, capsys):
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"url": "x.jpg", "caption": "c"}) + "\n")
    code = main(["shard", "--manifest", str(man), "--output", "s3://no-such-bucket-i12/corpus", *RUN])
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INVOCATION
    assert "output bucket s3://no-such-bucket-i12 does not exist" in captured.err and "aws s3 mb" in captured.err
    assert "ERROR:" in captured.out  # the summary is printed too
    fs, _ = storage.get_fs("s3://mplug2")
    assert "no-such-bucket-i12" not in [b.rstrip("/") for b in fs.ls("", refresh=True)]


def test_bad_credentials_say_one_line_without_traceback(s3_server, s3_bucket, tmp_path):
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"url": "x.jpg", "caption": "c"}) + "\n")
    # key variables win over the server's credentials file: the right key id with a wrong secret
    env = {**os.environ, **s3_server.env(), "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": "wrong-secret", "PYTHONPATH": str(ROOT),
           "MPLUG2_S3_RETRY_DEADLINE_S": "5"}
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "shard", "--manifest", str(man), "--output",
                          f"{s3_bucket}/c", *RUN], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == EXIT_BAD_INVOCATION, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mplug2-data: error:")]
    assert len(errors) == 1 and "denied" in errors[0] and "AWS_SECRET_ACCESS_KEY" in errors[0]


def test_storage_outage_past_the_deadline_prints_the_summary_and_exits_3(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port where nothing listens: the store is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("MPLUG2_S3_RETRY_DEADLINE_S", "1")
    storage.reset_fs_cache()
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"url": "x.jpg", "caption": "c"}) + "\n")
    try:
        code = main(["shard", "--manifest", str(man), "--output", "s3://down/corpus", *RUN])
    finally:
        storage.reset_fs_cache()
    out = capsys.readouterr().out
    assert code == EXIT_STORAGE_UNAVAILABLE
    assert "STORAGE UNAVAILABLE" in out and "samples" in out and "re-run the same command" in out


def test_exit_codes_are_distinct():
    assert len({EXIT_OK, EXIT_TOO_MANY_FAILED, EXIT_BAD_INVOCATION, EXIT_STORAGE_UNAVAILABLE, EXIT_INCOMPLETE}) == 5
    down = RunSummary("o", "m", "f", shards_failed={0: "StorageUnavailableError: put: storage still failing"})
    assert down.exit_code == EXIT_STORAGE_UNAVAILABLE
    assert RunSummary("o", "m", "f", shards_failed={0: "TimeoutError"}).exit_code == EXIT_INCOMPLETE


# --------------------------------------------------------------------------------- provenance
def test_incremental_run_with_another_manifest_is_refused(small_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(small_dataset / "out", out)
    before = _digest(out)
    other = small_dataset / "other.jsonl"
    other.write_text(json.dumps({"url": "media/i0.jpg", "caption": "new"}) + "\n")
    code = main(["shard", "--manifest", str(other), "--output", str(out), "--samples-per-shard", "1", *RUN])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INVOCATION and "built from other manifests" in err and "--mode extend" in err
    assert _digest(out) == before  # committed shards and dataset.json untouched
    # extend records both manifests, each with its shard range
    assert main(["shard", "--manifest", str(small_dataset / "m.jsonl"), str(other), "--output", str(out),
                 "--samples-per-shard", "1", "--mode", "extend", *RUN]) == EXIT_OK
    ds = json.loads((out / "dataset.json").read_text())
    assert {Path(m["path"]).name: m["shards"] for m in ds["manifests"]} == {"m.jsonl": [0, 1], "other.jsonl": [2, 2]}


# --------------------------------------------------------------------------------- not media
def test_html_served_with_200_is_not_media_with_type_and_url(http_server, tmp_path):
    from pipelines.fetch import FetchOptions, Fetcher
    from pipelines.errors import SampleError

    http_server.routes["/page.jpg"] = (200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>consent</html>")
    http_server.routes["/soft.mp4"] = (200, {"Content-Type": "application/octet-stream"},
                                       b"\n  <!DOCTYPE html><html><body>gone</body></html>")
    f = Fetcher(FetchOptions(retries=0))
    with pytest.raises(SampleError) as exc:
        f.fetch(http_server.url("/page.jpg"))
    assert exc.value.reason == "not_media" and "text/html" in exc.value.message
    assert http_server.url("/page.jpg") in exc.value.message
    man = tmp_path / "v.jsonl"
    man.write_text(json.dumps({"url": http_server.url("/soft.mp4"), "caption": "c"}) + "\n")
    summary = preprocess(PreprocessConfig(manifest=[str(man)], output=str(tmp_path / "out"), modality="video",
                                          executor="local", num_cpus=1, progress=False, allow_all_failed=True))
    assert summary.failures == {"not_media": 1}
    import pyarrow.parquet as pq

    (row,) = pq.read_table(tmp_path / "out" / "train-000000.parquet").to_pylist()
    assert row["error_reason"] == "not_media" and http_server.url("/soft.mp4") in row["error_message"]
    assert "HTML" in row["error_message"] and "/tmp" not in row["error_message"]


# --------------------------------------------------------------------------------- verify
def test_verify_lists_damaged_shards_and_invalid_json(small_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(small_dataset / "out", out)
    data = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(data[:700])              # truncated
    samples = shards.read_tar(str(out / "train-000001.tar"))
    key = next(iter(samples))
    samples[key]["json"] = b'{"punsafe":NaN}'                        # what json.dumps writes for NaN
    shards.write_tar(str(out / "train-000001.tar"), samples)
    code = main(["verify", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and "Traceback" not in printed
    assert "train-000000.tar: damaged, not a readable tar (ReadError" in printed
    assert f"train-000001.tar: {key}.json: invalid JSON (NaN is not JSON)" in printed


# --------------------------------------------------------------------------------- CLI details
def test_help_prints_each_default_once(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["shard", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exc.value.code == 0
    assert text.count("(default: 1000)") == 1 and "(default: None)" not in text
    assert text.count("(default: 120.0)") == 1 and "Exit codes: 0 ok, 1 too many failed samples" in text


def test_column_names_accept_commas_and_summary_keeps_reason_and_count_apart():
    from pipelines.cli import build_parser, config_from_args

    args = build_parser().parse_args(["shard", "--manifest", "m.tsv", "--output", "o", "--column-names",
                                      "caption,url"])
    assert config_from_args(args).column_names == ["caption", "url"]
    assert PreprocessConfig(column_names=["caption", "url"]).column_names == ["caption", "url"]
    table = RunSummary("o", "m", "f", rows=3, failures={"clip_out_of_range": 2, "not_found": 1}).table()
    assert "  clip_out_of_range  2" in table and "  not_found          1" in table


# --------------------------------------------------------------------------------- uncommitted shards
@pytest.mark.parametrize("where", ["local", "s3"])
def test_uncommitted_tar_is_never_listed(where, tmp_path, request, monkeypatch):
    url = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/pending"
    out = shards.Output(url)
    out.ensure()
    seen_at_marker: list[list[str]] = []
    orig_write = shards.Output.write_bytes

    def spy(self, name, data):
        if name.endswith("_stats.json"):
            seen_at_marker.append([n for n in self.list_names() if n.endswith(".tar")])
        orig_write(self, name, data)

    monkeypatch.setattr(shards.Output, "write_bytes", spy)
    tar = tmp_path / "t.tar"
    shards.write_tar(str(tar), {"000000_000000": {"txt": b"x"}})
    stats = {"nsamples": 1}

    def killed(self, src, dst):  # the process dies after the marker, before the publish
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.Output, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        shards.commit_shard(out, "train", 0, str(tar), b"pq", stats)
    monkeypatch.undo()
    assert seen_at_marker == [[]]                                  # no tar visible before its marker
    assert not [n for n in out.list_names() if n.endswith(".tar")]
    assert shards.recover_commits(out, "train") == 1                # the next run rolls it forward
    assert "train-000000.tar" in out.list_names() and "train-000000.tar.pending" not in out.list_names()
    assert shards.read_tar(out.read_bytes("train-000000.tar")) == {"000000_000000": {"txt": b"x"}}


def test_every_row_failed_on_the_ray_data_path(tmp_path, ray_local):
    """The same hold-back on Ray Data: nothing committed when no row succeeds; a dead first shard of a
    working run is committed once another shard succeeded."""
    _images(tmp_path / "media", 2)
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"url": n, "caption": "c"}) + "\n" for n in ("gone0.jpg", "gone1.jpg")))
    cfg = dict(manifest=[str(man)], output=str(tmp_path / "out"), samples_per_shard=2, executor="ray",
               progress=False, image_size=32)
    dead = preprocess(PreprocessConfig(**cfg))
    assert dead.exit_code == EXIT_TOO_MANY_FAILED and dead.failures == {"not_found": 2}
    assert not list((tmp_path / "out").glob("*.tar"))
    man.write_text("".join(json.dumps({"url": n, "caption": "c"}) + "\n"
                           for n in ("gone0.jpg", "gone1.jpg", "media/i0.jpg", "media/i1.jpg")))
    ok = preprocess(PreprocessConfig(**cfg))
    assert ok.exit_code == EXIT_OK and ok.shards_written == [0, 1] and (ok.successes, ok.failed) == (2, 2)
