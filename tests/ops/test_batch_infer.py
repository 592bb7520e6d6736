"""``mplug2-infer`` on a real Ray: a killed embed run resumes to exactly one row per sample, and ``retrieve``
searches the output folder. Damaged input shards are reported and skipped, without Ray (``infer_shard``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.data.dataset_index import load_index
from mplug2 import storage
from mplug2.inference.corpus import MARKER, InferOptions, infer_shard, output_url
from mplug2.inference.index import read_index
from mplug2.models.mplug2 import MPLUG2

REPO = Path(__file__).resolve().parents[2]
NUM_CLIPS, PER_SHARD = 24, 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny-preset model folder (random weights: the properties tested here do not depend on training)."""
    torch.manual_seed(0)
    return MPLUG2(MPLUG2Config.preset("tiny")).save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> Path:
    """The demo's kind of corpus, small: synthetic captioned clips preprocessed into 12 shards of 2 clips."""
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_video_corpus

    root = tmp_path_factory.mktemp("corpus")
    manifest = make_video_corpus(root / "src", NUM_CLIPS, seed=3, num_frames=8, size=32)
    summary = preprocess(PreprocessConfig(
        manifest=[str(manifest)], output=str(root / "shards"), modality="video", samples_per_shard=PER_SHARD,
        num_frames=4, frame_size=32, executor="local", num_cpus=1, progress=False))
    assert summary.successes == NUM_CLIPS, summary.failures
    return root / "shards"


def _infer_cmd(head, task: str, model: Path, shards: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.infer", task, "--model", str(model), "--shards", str(shards),
            "--output", str(output), "--address", head.gcs_address, "--max-workers", "1", "--batch-size", "1",
            "--no-progress", *extra]


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, deadline_s: float = 300.0):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class ResumedRun:
    shards: Path
    output: Path
    done_at_kill: int
    rerun: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def resumed_embed_run(ray_head, tiny_model, video_shards, tmp_path_factory) -> ResumedRun:
    """``embed`` SIGKILLed once its first output parquet is committed, then the same command again."""
    output = tmp_path_factory.mktemp("infer") / "emb"
    env = {**ray_head.env, "PYTHONPATH": str(REPO)}
    cmd = _infer_cmd(ray_head, "embed", tiny_model, video_shards, output)
    committed = lambda: sorted(output.glob("train-*.parquet")) if output.exists() else []  # noqa: E731
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        _wait_for(committed, "the first committed output parquet", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    done_at_kill = len(committed())
    return ResumedRun(video_shards, output, done_at_kill, ray_head.run(*cmd, timeout=600))


@pytest.mark.slow
def test_killed_embed_run_resumes_to_one_row_per_sample(resumed_embed_run, video_shards):
    run, index = resumed_embed_run, load_index(str(video_shards))
    assert 1 <= run.done_at_kill < len(index), f"killed after {run.done_at_kill} of {len(index)} shards: not mid-run"
    out = run.rerun.stdout
    assert run.rerun.returncode == 0, out + run.rerun.stderr
    skipped = int(out.split("shards skipped")[1].split()[0])
    done = int(out.split("shards done")[1].split()[0])
    # Actors of the killed driver may commit one more shard before Ray reaps them: the counts still add up.
    assert skipped >= run.done_at_kill and done >= 1 and skipped + done == len(index), out

    index_read = read_index(str(run.output))          # what `mplug2-model retrieve --index <folder>` reads
    keys = [k for shard in index.shards for k in _shard_keys(shard.url)]
    assert len(keys) == NUM_CLIPS
    for modality in ("video", "text"):
        ids = [i for i, m in zip(index_read.ids, index_read.modalities) if m == modality]
        assert sorted(ids) == sorted(keys), f"{modality} rows are not one per sample exactly once"
    assert tuple(index_read.embeddings.shape) == (2 * NUM_CLIPS, MPLUG2Config.preset("tiny").embed_dim)
    assert not list(run.output.glob("*.partial*")), "a half-written output is visible"


@pytest.mark.slow
def test_retrieve_searches_the_output_folder(resumed_embed_run, tiny_model, ray_head):
    """``mplug2-model retrieve --index <output folder>`` ranks the corpus's clips for a sample's caption exactly as
    the index's embeddings say (an untrained model: which clip wins is not the point, searching all shards is)."""
    from mplug2.inference.predictor import Predictor

    index = read_index(str(resumed_embed_run.output))
    shard = load_index(str(resumed_embed_run.shards)).shards[3]
    captions = pq.read_table(output_url(str(resumed_embed_run.output), shard))
    query = captions.column("caption")[0].as_py()
    found = ray_head.run(sys.executable, "-m", "mplug2.cli", "retrieve", "--model", str(tiny_model),
                         "--index", str(resumed_embed_run.output), "--query", query, "-k", "5", "--json",
                         "--device", "cpu", timeout=300)
    assert found.returncode == 0, found.stdout + found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines() if line.startswith("{")]

    video = [i for i, m in enumerate(index.modalities) if m == "video"]
    scores = Predictor.load(str(tiny_model)).embed_texts([query])[0] @ index.embeddings[video].t()
    expected = [index.ids[video[j]] for j in scores.topk(5).indices.tolist()]
    assert [h["id"] for h in hits] == expected and {h["modality"] for h in hits} == {"video"}, found.stdout


def _shard_keys(url: str) -> list[str]:
    from mplug2.data.stream import iter_tar_samples

    with open(url, "rb") as f:
        return [s["__key__"] for s in iter_tar_samples(f, url)]


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from mplug2.inference.predictor import Predictor

    return Predictor.load(str(tiny_model), device="cpu")


def test_damaged_shards_are_reported_and_skipped(predictor, video_shards, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(video_shards, corpus)
    shards = load_index(str(corpus)).shards
    data = Path(shards[0].url).read_bytes()
    Path(shards[0].url).write_bytes(data[: len(data) // 2])                     # truncated mid-member
    Path(shards[1].url).write_bytes(os.urandom(len(data)))                      # garbage
    with tarfile.open(shards[2].url) as tar:
        frame = [m for m in tar.getmembers() if m.name.endswith(".f001.jpg")][1]
    raw = bytearray(Path(shards[2].url).read_bytes())
    raw[frame.offset_data + frame.size // 2] ^= 0x01                            # one flipped bit inside a frame
    Path(shards[2].url).write_bytes(bytes(raw))
    os.remove(shards[3].url)                                                    # listed but missing
    out = tmp_path / "out"
    options = InferOptions(task="embed", batch_size=2)
    results = [infer_shard(predictor, s, str(out), options) for s in shards[:5]]
    assert [r.status for r in results] == ["damaged"] * 4 + ["done"], results
    assert "sha256" in results[2].error and "missing" in results[3].error
    assert [p.name for p in sorted(out.glob("*"))] == ["train-000004.parquet"]
    table = pq.read_table(out / "train-000004.parquet")
    assert table.num_rows == 2 * PER_SHARD
    assert json.loads(table.schema.metadata[b"mplug2.infer"])["samples"] == PER_SHARD


def test_caption_and_qa_outputs(predictor, video_shards, tmp_path):
    shard = load_index(str(video_shards)).shards[0]
    cap = infer_shard(predictor, shard, str(tmp_path / "cap"), InferOptions(task="caption", batch_size=2,
                                                                           beam_size=2, max_len=4))
    qa = infer_shard(predictor, shard, str(tmp_path / "qa"), InferOptions(task="qa", question="what colour?"))
    assert cap.status == qa.status == "done", (cap, qa)
    captions = pq.read_table(output_url(str(tmp_path / "cap"), shard)).to_pylist()
    answers = pq.read_table(output_url(str(tmp_path / "qa"), shard)).to_pylist()
    assert [r["id"] for r in captions] == [r["id"] for r in answers] == _shard_keys(shard.url)
    assert all(isinstance(r["caption"], str) and r["reference"].startswith("a ") for r in captions)
    assert all(r["question"] == "what colour?" and isinstance(r["answer"], str) for r in answers)


def test_cli_errors_are_one_line(tiny_model, video_shards, tmp_path, capsys):
    from jobs.infer import main

    cases = [
        (["embed", "--model", str(tiny_model), "--shards", str(tmp_path / "nothing"), "--output", str(tmp_path)],
         "neither dataset.json"),
        (["embed", "--model", str(tmp_path / "no-model"), "--shards", str(video_shards), "--output",
          str(tmp_path / "o")], "no such model folder"),
        (["embed", "--model", str(tiny_model), "--shards", str(video_shards), "--output", str(video_shards)],
         "must differ"),
        (["embed", "--model", str(tiny_model), "--shards", str(video_shards), "--output", str(tmp_path / "o"),
          "--batch-size", "0"], "must be >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    out = tmp_path / "emb"
    (out).mkdir()
    (out / "_infer.json").write_text(json.dumps({"format": "mplug2-infer/1", "task": "caption", "model": "m",
                                                 "shards": "s", "split": "train", "options": {}}))
    assert main(["embed", "--model", str(tiny_model), "--shards", str(video_shards), "--output", str(out)]) == 2
    assert "holds caption outputs" in capsys.readouterr().err


def test_s3_output_plan_resume_and_read_index(predictor, video_shards, s3_bucket):
    from mplug2.inference.corpus import plan_run

    out = f"{s3_bucket}/emb"
    options = InferOptions(task="embed", batch_size=4)
    plan = plan_run(str(video_shards), out, model="tiny", options=options)
    assert len(plan.pending) == NUM_CLIPS // PER_SHARD and not plan.finished
    for shard in plan.pending[:2]:
        assert infer_shard(predictor, shard, out, options).status == "done"
    again = plan_run(str(video_shards), out, model="tiny", options=options)
    assert [s.name for s in again.finished] == [s.name for s in plan.pending[:2]]
    index = read_index(out)                    # the s3:// prefix as retrieve reads it: the marker is not an index
    assert len(index) == 2 * 2 * PER_SHARD and sorted(set(index.modalities)) == ["text", "video"]
    assert len(read_index(output_url(out, plan.pending[0]))) == 2 * PER_SHARD
    assert storage.exists(f"{out}/{MARKER}")
