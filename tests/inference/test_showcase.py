"""The demo's showcase: held-out clips captioned and questions answered with a run's exported model, printed next
to the ground truth, plus the command for one's own file."""

from __future__ import annotations

import json

from jobs.showcase import showcase
from mplug2.cli import main
from pipelines.synthetic import make_qa_corpus, make_video_corpus


def test_showcase_prints_predictions_next_to_ground_truth(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["convert", "--preset", "tiny", "--out", str(runs / "caption" / "best")]) == 0
    assert main(["convert", "--preset", "tiny", "--out", str(runs / "qa" / "final")]) == 0   # no best: final
    videos = make_video_corpus(tmp_path / "corpus", 2, seed=1, num_frames=8, size=32, split="eval")
    qa = make_qa_corpus(tmp_path / "corpus", 2, seed=2, size=32, split="eval")
    capsys.readouterr()
    text = showcase(str(runs / "caption"), str(runs / "qa"), str(videos), str(qa), tmp_path / "models", n=2)
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["clip", "caption", "(model)"] and len(lines) >= 12
    assert "ERROR" not in text
    truth = [line for line in open(videos)]
    assert all(json.loads(t)["caption"] in text for t in truth)
    assert f"mplug2-model caption YOUR_FILE_OR_URL --model {tmp_path / 'models' / 'caption'}" in text
    assert (tmp_path / "models" / "qa" / "model.safetensors").exists()
