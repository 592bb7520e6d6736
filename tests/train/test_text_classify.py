"""``text_classify``: GLUE-style tsv files (single sentences and pairs, int or string labels), one-line
errors naming file and line for malformed input, a resumable per-rank loader, data-parallel evaluation with
accuracy / F1 / Matthews, and ``mplug2-train`` refusing a bad tsv before any worker starts."""

from __future__ import annotations

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.data.glue import GlueFormatError, TextPairLoader, label_ids, label_set, read_glue_tsv, tokenize
from mplug2.eval.classification_metrics import classification_scores
from mplug2.models.mplug2 import MPLUG2
from mplug2.tokenizer import load_tokenizer
from mplug2.train.config import TrainConfig
from mplug2.train.tasks import EvalContext, get_task
from tests.tiny import one_thread  # noqa: F401  (fixture)


def _tsv(path, *rows: str):
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_reads_single_sentences_and_pairs_by_glue_header_names(tmp_path):
    sst = read_glue_tsv(_tsv(tmp_path / "sst.tsv", "sentence\tlabel", "a fine film\t1", "dull\t0"))
    assert (sst.text_a, sst.text_b, sst.labels, sst.lines) == (["a fine film", "dull"], None, ["1", "0"], [2, 3])
    qnli = read_glue_tsv(_tsv(tmp_path / "qnli.tsv", "index\tquestion\tsentence\tlabel",
                              "0\twhat is red?\ta red circle\tentailment"))
    assert (qnli.text_a, qnli.text_b) == (["what is red?"], ["a red circle"])
    mnli = read_glue_tsv(_tsv(tmp_path / "mnli.tsv", "index\tgenre\tsentence1\tsentence2\tgold_label",
                              "0\tfiction\ta b\tc d\tneutral", "1\tfiction\te\tf\tcontradiction"))
    assert (mnli.text_a, mnli.text_b, mnli.labels) == (["a b", "e"], ["c d", "f"], ["neutral", "contradiction"])
    assert label_set(mnli) == ["contradiction", "neutral"]
    assert label_set(read_glue_tsv(_tsv(tmp_path / "n.tsv", "sentence\tlabel", *[f"s\t{i}" for i in (10, 2, 1)]))) \
        == ["1", "2", "10"]                                   # int labels in numeric order
    named = read_glue_tsv(str(tmp_path / "mnli.tsv"), text_columns=["sentence2"], label_column="genre")
    assert (named.text_a, named.text_b, named.labels) == (["c d", "f"], None, ["fiction", "fiction"])


@pytest.mark.parametrize("rows, message", [
    ((), r"empty file"),
    (("sentence\tlabel",), r"a header and no examples"),
    (("index\tsentence1\tsentence2", "0\ta\tb"), r":1: no label column .*GLUE test files carry no labels"),
    (("sentence\tlabel", "good\t1", "a\ttab inside\t0"), r":3: 3 tab-separated fields, the header has 2"),
    (("sentence\tlabel", "good\t1", "truncated"), r":3: 1 tab-separated fields"),
    (("text\tlabel", "good\t1"), r":1: no text column in the header \(text, label\)"),
    (("sentence1\tsentence2\tgold_label", "a\tb\t-"), r":2: empty label"),
])
def test_malformed_files_fail_naming_file_and_line(tmp_path, rows, message):
    path = _tsv(tmp_path / "bad.tsv", *rows)
    with pytest.raises(GlueFormatError, match=message) as err:
        read_glue_tsv(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(GlueFormatError, match="no such file"):
        read_glue_tsv(str(tmp_path / "absent.tsv"))
    (tmp_path / "latin.tsv").write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n")
    with pytest.raises(GlueFormatError, match=r"latin.tsv:3: not UTF-8"):
        read_glue_tsv(str(tmp_path / "latin.tsv"))


def test_an_eval_label_outside_the_train_label_set_names_its_line(tmp_path):
    dev = read_glue_tsv(_tsv(tmp_path / "dev.tsv", "sentence\tlabel", "a\tpositive", "b\tmaybe"))
    with pytest.raises(GlueFormatError, match=r"dev.tsv:3: label 'maybe' is not one of the 2 classes"):
        label_ids(dev, ["negative", "positive"])


def test_pairs_are_encoded_cls_a_sep_b_sep():
    tok = load_tokenizer("bert-base-uncased")
    enc = tokenize(tok, ["a red circle"], ["it is red"], max_length=16)
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=False) == "[CLS] a red circle [SEP] it is red [SEP]"
    short = tokenize(tok, ["a red circle and a blue square"], ["it is red"], max_length=8)
    assert short["input_ids"].shape[1] == 8 and int((short["input_ids"][0] == tok.sep_token_id).sum()) == 2


def test_loader_gives_ranks_disjoint_batches_and_resumes_exactly(tmp_path):
    tok = load_tokenizer("tiny")
    data = read_glue_tsv(_tsv(tmp_path / "t.tsv", "sentence\tlabel", *[f"s{i}\t{i % 2}" for i in range(20)]))
    loaders = [TextPairLoader(data, ["0", "1"], tok, batch_size=4, max_length=8, seed=3, rank=r, world_size=2)
               for r in range(2)]
    assert loaders[0].steps_per_epoch == 2
    first = [next(ld)["keys"] for ld in loaders]
    assert not set(first[0]) & set(first[1])
    epoch0 = first[0] + next(loaders[0])["keys"]
    state = loaders[0].state_dict()
    after = [next(loaders[0]) for _ in range(3)]
    assert after[0]["epoch"] == 1 and sorted(after[0]["keys"] + after[1]["keys"]) != sorted(epoch0)
    again = TextPairLoader(data, ["0", "1"], tok, batch_size=4, max_length=8, seed=3, rank=0, world_size=2)
    again.load_state_dict(state)
    assert [next(again)["keys"] for _ in range(3)] == [b["keys"] for b in after]
    assert torch.equal(after[0]["labels"], torch.tensor([int(k.rsplit(":", 1)[1]) % 2 for k in after[0]["keys"]]))
    with pytest.raises(ValueError, match="train file or the number of workers changed"):
        TextPairLoader(data, ["0", "1"], tok, batch_size=4, max_length=8, world_size=1).load_state_dict(state)
    with pytest.raises(GlueFormatError, match="fewer than one global batch"):
        TextPairLoader(data, ["0", "1"], tok, batch_size=16, max_length=8, world_size=2)


def test_binary_scores_match_their_definitions():
    gold = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    pred = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1])          # tp 3, fn 1, fp 1, tn 3
    s = classification_scores(pred, gold, 2)
    assert s["accuracy"] == 75.0 and s["f1"] == pytest.approx(75.0) and s["matthews"] == pytest.approx(0.5)
    assert classification_scores(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2)["matthews"] == 0.0
    assert set(classification_scores(torch.tensor([2, 0]), torch.tensor([2, 1]), 3)) == {"accuracy"}


DEV_ROWS = ("sentence1\tsentence2\tlabel",
            *[f"a red circle {i}\tit is {'red' if i % 3 else 'blue'}\t{i % 2}" for i in range(11)])


def _dev_scores(path: str, rank: int = 0, world: int = 1) -> dict[str, float]:
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    cfg = TrainConfig(run_name="r", task="text_classify", classes=["0", "1"])
    spec = get_task("text_classify")
    task = spec.build(cfg, MPLUG2(MPLUG2Config.preset("tiny")), tok, 1).eval()
    data = spec.load_eval(cfg, path, rank, world)
    with torch.no_grad():
        return {"items": len(data), **spec.evaluate(task, data, EvalContext(tok, max_text_len=16, batch_size=4))}


def _rank(rank: int, port: int, path: str, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = _dev_scores(path, rank, 2)
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_their_halves_and_report_the_single_process_numbers(tmp_path):
    import torch.multiprocessing as mp

    from mplug2.runtime import free_loopback_port

    path = _tsv(tmp_path / "dev.tsv", *DEV_ROWS)
    single = _dev_scores(path)
    assert set(single) == {"items", "accuracy", "f1", "matthews"} and single["items"] == 11
    with mp.get_context("spawn").Manager() as manager:   # not fork: the session holds a Ray driver
        results = manager.dict()
        mp.spawn(_rank, args=(free_loopback_port(), path, results), nprocs=2, join=True)
        results = {r: dict(results[r]) for r in range(2)}
    assert [results[r]["items"] for r in range(2)] == [6, 5]
    for r in range(2):
        assert {k: v for k, v in results[r].items() if k != "items"} == pytest.approx(
            {k: v for k, v in single.items() if k != "items"}, abs=1e-6)


def test_train_step_learns_and_config_checks(tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    train = _tsv(tmp_path / "train.tsv", "sentence\tlabel", *[f"{w} circle\t{w}" for w in ("red", "blue") * 8])
    cfg = TrainConfig.from_dict({"run_name": "r", "task": "text_classify", "data": {"train": [
        {"name": "t", "path": train}], "batch_size": 8}})
    spec = get_task("text_classify")
    task = spec.build(cfg, MPLUG2(MPLUG2Config.preset("tiny")), tok, 1)
    assert task.classes == ["blue", "red"]
    loader = spec.train_loader(cfg, tok, 0, 1)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    for _ in range(30):
        out = task(next(loader))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["acc"]) == 1.0
    with pytest.raises(ValueError, match="reads one train tsv"):
        TrainConfig.from_dict({"run_name": "r", "task": "text_classify", "data": {"train": [
            {"name": "a", "path": train}, {"name": "b", "path": train}]}})
    with pytest.raises(ValueError, match="unknown task_options"):
        TrainConfig(run_name="r", task="text_classify", task_options={"columns": ["x"]})


def test_finetune_refuses_a_bad_tsv_in_one_line_before_starting_ray(tmp_path, capsys):
    from mplug2.train.cli import main as train_cli

    train = _tsv(tmp_path / "train.tsv", "sentence\tlabel", "good\t1", "bad\t0")
    dev = _tsv(tmp_path / "dev.tsv", "sentence\tlabel", "fine\t1", "meh\tmaybe")
    rc = train_cli(["finetune", "--config", "configs/text_classify_tiny.yaml", "--storage", str(tmp_path / "runs"),
                    "--set", f"data.train=[{{name: t, path: {train}}}]", "--set", f"data.eval.path={dev}",
                    "--address", "127.0.0.1:1"])       # never reached: the check runs before Ray
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err == f"mplug2-train: error: {dev}:3: label 'maybe' is not one of the 2 classes of the train file (0, 1)"
