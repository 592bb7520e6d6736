"""Run configs: YAML presets load, overrides parse, and the resume fingerprint tracks exactly the numerics."""

from __future__ import annotations

from pathlib import Path

import pytest

from mplug2.train.build import lr_lambda, model_config
from mplug2.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in ROOT.glob("*.yaml") if not p.name.startswith("preprocess_"))   # run configs


@pytest.mark.parametrize("path", sorted(ROOT.glob("preprocess_*.yaml")), ids=lambda p: p.name)
def test_shipped_preprocess_configs_load_and_validate(path):
    from pipelines.config import PreprocessConfig

    cfg = PreprocessConfig.from_yaml(str(path))
    cfg.validate()
    assert cfg.output and cfg.manifest


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_run_configs_load_and_build_their_model_config(path):
    cfg = TrainConfig.from_yaml(path)
    assert model_config(cfg).text.num_uni_layer == 2
    assert TrainConfig.from_dict(cfg.to_dict()).fingerprint() == cfg.fingerprint()


def test_overrides_are_parsed_as_yaml_scalars():
    cfg = TrainConfig.from_yaml(CONFIGS[0], {"optim.lr": "3e-4", "schedule.total_steps": "7", "run_name": "x"})
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.schedule.total_steps == 7 and cfg.run_name == "x"


def test_fingerprint_tracks_numerics_not_operations():
    base = TrainConfig(run_name="r")
    same = TrainConfig(run_name="r")
    same.scale.max_failures, same.debug.fail_at_step, same.schedule.ckpt_every_steps = 9, 3, 7
    assert same.fingerprint() == base.fingerprint()
    for change in (lambda c: setattr(c.optim, "lr", 1.0), lambda c: setattr(c, "seed", 1),
                   lambda c: setattr(c.schedule, "total_steps", 5), lambda c: setattr(c, "init_from", "x"),
                   lambda c: setattr(c.data, "batch_size", 3), lambda c: setattr(c.scale, "num_workers", 4)):
        other = TrainConfig(run_name="r")
        change(other)
        assert other.fingerprint() != base.fingerprint()


@pytest.mark.parametrize("bad", [dict(task="nope"), dict(resume="maybe"), dict(run_name="a/b"),
                                 dict(scale={"strategy": "fsdp"}), dict(scale={"precision": "fp16"}),
                                 dict(data={"crop_scale": [0.0, 1.0]}), dict(data={"crop_scale": [0.9, 0.5]}),
                                 dict(data={"crop_scale": 0.8}), dict(data={"crop_scale": ["a", 1]})])
def test_bad_configs_fail_at_start_up(bad):
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"run_name": "r", **bad})


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig.from_dict({"run_name": "r", "optim": {"warmup_steps": 10, "min_lr_ratio": 0.1},
                                 "schedule": {"total_steps": 110}})
    f = lr_lambda(cfg)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_crop_scale_reaches_the_training_loader(tmp_path):
    """``data.crop_scale`` (YAML list or ``--set``) is the crop range the training loader's transform draws from."""
    from mplug2.train.build import build_train_loader
    from tests.data.shards_fixture import write_shards

    write_shards(str(tmp_path / "images"), [32], size=(40, 36))
    cfg = TrainConfig.from_yaml(ROOT / "retrieval_tiny.yaml", overrides={"data.crop_scale": "[0.8, 1.0]"})
    assert cfg.data.crop_scale == (0.8, 1.0)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "eval": None,
                                 "train": [{"name": "images", "path": str(tmp_path / "images"), "num_frames": 1}]}})
    loader = build_train_loader(cfg, model_config(cfg), rank=0, world_size=1)
    assert loader.loaders["images"].builder.transform.cfg.crop_scale == (0.8, 1.0)
    assert TrainConfig(run_name="r").data.crop_scale == (0.5, 1.0)      # the ALBEF / BLIP default


def test_finetune_with_a_missing_init_from_fails_in_one_line_before_starting_ray(tmp_path, capsys):
    """A fresh run's ``init_from`` is checked on the driver: one line naming the setting, no Ray started."""
    from mplug2.train.cli import main as train_cli

    missing = tmp_path / "no-such-run"
    rc = train_cli(["finetune", "--config", str(ROOT / "retrieval_tiny.yaml"), "--storage", str(tmp_path / "runs"),
                    "--set", f"init_from={missing}", "--address", "127.0.0.1:1"])   # never reached
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert err.startswith(f"mplug2-train: error: init_from={missing}: neither a model folder"), err
    assert "--set init_from=" in err, err


def test_finetune_with_a_missing_validation_corpus_fails_in_one_line_before_starting_ray(tmp_path, capsys):
    """The eval and validation corpora are checked on the driver too: a wrong path used to fail the evaluation
    after the whole training."""
    from mplug2.train.cli import main as train_cli
    from tests.data.shards_fixture import write_shards

    write_shards(str(tmp_path / "eval"), [4], split="eval")
    missing = tmp_path / "no-such-corpus"
    rc = train_cli(["finetune", "--config", str(ROOT / "retrieval_tiny.yaml"), "--storage", str(tmp_path / "runs"),
                    "--set", "init_from=null", "--set", f"data.eval.path={tmp_path / 'eval'}",
                    "--set", "data.val.name=val", "--set", "data.val.split=val", "--set", f"data.val.path={missing}",
                    "--address", "127.0.0.1:1"])   # never reached
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert err.startswith(f"mplug2-train: error: data.val (split 'val'): {missing}: neither dataset.json"), err
    assert "point data.val.path at a folder of shards" in err, err


@pytest.mark.parametrize("key,value", [("optim.lr", "abc"), ("optim.lr_temporal", "fast"), ("optim.lr_vision", "-1")])
def test_a_learning_rate_that_is_not_one_fails_in_one_line_before_starting_ray(tmp_path, capsys, key, value):
    from mplug2.train.cli import main as train_cli

    rc = train_cli(["finetune", "--config", str(ROOT / "retrieval_tiny.yaml"), "--storage", str(tmp_path / "runs"),
                    "--set", f"{key}={value}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"{key} must be a learning rate" in err, err


@pytest.mark.parametrize("setting,message", [
    ("schedule.total_steps=abc", "schedule.total_steps must be an integer; got 'abc' (a string)"),
    ("seed=x", "seed must be an integer; got 'x' (a string)"),
    ("scale.num_workers=1.5", "scale.num_workers must be an integer; got 1.5"),
    ("scale.use_gpu=maybe", "scale.use_gpu must be true or false; got 'maybe' (a string)"),
    ("schedule.log_every_steps=0", "schedule.log_every_steps must be >= 1; got 0"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction must be between 0.0 and 1.0; got 2"),
    ("data.batchsize=3", "data: unknown key 'batchsize' (did you mean 'data.batch_size'?); known: train, eval,"),
    ("runname=x", "unknown key 'runname' (did you mean 'run_name'?); known: run_name, storage,"),
    ("schedule=5", "schedule must be a mapping of ScheduleConfig fields; got 5"),
    ("data.eval.nmae=x", "data.eval: unknown key 'nmae' (did you mean 'data.eval.name'?)"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got (0.9, 1.5)"),
    # the model section: before, these reached Ray's wait for a cluster (or a TypeError in the workers)
    ("model.itm_reversed_negatives=abc", "model: itm_reversed_negatives must be a number, got 'abc'"),
    ("model.momentum=1.5", "model: invalid MPLUG2Config: momentum and alpha must be in [0, 1]"),
    ("model.text.hidden=abc", "model: text.hidden must be a positive int, got 'abc'"),
    ("model.bogus=1", "model: unknown MPLUG2Config keys: ['bogus']"),
])
def test_a_wrong_key_type_or_range_fails_in_one_line_naming_the_field_before_starting_ray(tmp_path, capsys, setting,
                                                                                         message):
    """Before: a typo read as a Python signature error and wrong values reached the workers (or Ray's wait for
    a cluster) and failed there."""
    from mplug2.train.cli import main as train_cli

    rc = train_cli(["pretrain", "--config", str(ROOT / "pretrain_tiny.yaml"), "--storage", str(tmp_path / "runs"),
                    "--set", setting, "--address", "127.0.0.1:1"])       # never reached: the check runs first
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert err.startswith(f"mplug2-train: error: {ROOT / 'pretrain_tiny.yaml'}: {message}"), err


def test_yaml_floats_without_a_dot_are_numbers_and_ints_stay_ints(tmp_path):
    """PyYAML reads `3e-4` as a string (YAML 1.1); a float field takes the number. An int in a float field stays
    an int, so the run's fingerprint (which hashes the values) is what it was."""
    path = tmp_path / "run.yaml"
    path.write_text("run_name: r\noptim: {lr: 3e-4, weight_decay: 0, lr_temporal: 1E-3}\nscale: {peak_tflops: 1e3}\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.optim.lr, cfg.optim.lr_temporal, cfg.scale.peak_tflops) == (3e-4, 1e-3, 1000.0)
    assert type(cfg.optim.weight_decay) is int
    assert cfg.fingerprint() == TrainConfig.from_dict({"run_name": "r", "optim": {
        "lr": 3e-4, "weight_decay": 0, "lr_temporal": 1e-3}}).fingerprint()


def test_the_model_section_takes_yaml_floats_without_a_dot_too(tmp_path):
    """Before: `model: {temp: 7e-2}` failed ("temp must be a number, got '7e-2'") where `optim: {lr: 3e-4}` passed."""
    from mplug2.train.build import model_config

    path = tmp_path / "run.yaml"
    path.write_text("run_name: r\nmodel: {preset: tiny, temp: 7e-2, itm_reversed_negatives: 5E-1, "
                    "vision: {drop_path: 1e-1}, text: {hidden_dropout: 0}}\n")
    mcfg = model_config(TrainConfig.from_yaml(path))
    assert (mcfg.temp, mcfg.itm_reversed_negatives, mcfg.vision.drop_path) == (0.07, 0.5, 0.1)
    assert type(mcfg.text.hidden_dropout) is int       # as in the other sections: an int stays an int
    with pytest.raises(ValueError, match="temp must be a number, got '7e-2x'"):
        TrainConfig.from_dict({"run_name": "r", "model": {"preset": "tiny", "temp": "7e-2x"}})


@pytest.mark.parametrize("line,message", [
    ("sampels_per_shard: 5", "unknown key 'sampels_per_shard' (did you mean 'samples_per_shard'?)"),
    ("samples_per_shard: abc", "samples_per_shard must be an integer; got 'abc' (a string)"),
    ("image_size: 1e2", "image_size must be an integer; got '1e2' (a string)"),
    ("drop_cols: key", "drop_cols must be a list; got 'key' (a string)"),
])
def test_a_preprocess_yaml_with_a_wrong_key_or_type_fails_in_one_line(tmp_path, capsys, line, message):
    """Before: a value of the wrong type in the YAML ended in a traceback from the validation's comparison."""
    from pipelines.cli import main as data_cli

    config = tmp_path / "p.yaml"
    config.write_text(f"manifest: [{tmp_path / 'm.csv'}]\noutput: {tmp_path / 'out'}\n{line}\n")
    assert data_cli(["shard", "--config", str(config), "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mplug2-data: error: {message}", err
    assert not (tmp_path / "out").exists()
