"""``python -m bench model``: the command every MFU and memory figure in docs/benchmarks.md comes from."""

from __future__ import annotations

import json

from bench import bench_model


def test_bench_model_reports_memory_flops_and_no_mfu_on_a_cpu(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert bench_model.main(["--presets", "tiny", "--steps", "1", "--warmup", "1", "--batch", "2", "--frames", "2",
                             "--threads", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["preset"] == "tiny" and row["device"] == "cpu" and row["batch"] == 2 and row["frames"] == 2
    assert row["peak_mem_gib"] > 0.05            # the process's peak RSS, not a TFLOP/s figure divided by 2**30
    assert row["flops_per_step"] > 0 and row["achieved_tflops"] > 0
    assert row["peak_tflops"] is None and row["mfu"] is None   # a CPU has no entry in the peak table
    table = capsys.readouterr().out
    assert "tiny" in table and "MFU" in table
