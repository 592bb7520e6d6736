"""Resume equivalence on Ray Train (training-and-ops §4.2), on a real SeaweedFS and a local Ray.

Run A trains N steps straight through. Run B loses a worker after step N/2 + 1 and Ray restarts the
worker group from the step-N/2 checkpoint. Run C is stopped (the job fails with no retries left) after the
same step and the same command is run again with the same run name. Two corpora are mixed, ITC uses its
queue and momentum twins, gradients accumulate over 2 micro-batches, both ranks use gloo.

B and C must end with the *same* parameters, momentum copies, optimizer state and queues as A (bitwise on
CPU), and every rank must have seen exactly the same sample keys at every step: nothing skipped, nothing
repeated.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch

from mplug2 import storage
from mplug2.train.checkpoint import TRAINER_FILE, load_checkpoint, read_model_tensors, validate_checkpoint
from mplug2.train.config import TrainConfig
from mplug2.train.trainer import fit

pytestmark = pytest.mark.slow

N = 8


def _config(shards: dict, storage_root: str, name: str, **debug) -> TrainConfig:
    return TrainConfig.from_dict(dict(
        run_name=name, storage=storage_root, task="pretrain", seed=7,
        model={"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522}},
        data=dict(train=[dict(name="video", path=shards["video"], num_frames=4, weight=0.5),
                         dict(name="image", path=shards["image"], num_frames=1, weight=0.5)],
                  batch_size=4, shuffle_buffer=8, shards_in_flight=2),
        optim=dict(lr=5e-4, lr_vision=5e-4, warmup_steps=2, grad_accum=2),
        schedule=dict(total_steps=N, ckpt_every_steps=2, log_every_steps=1),
        scale=dict(num_workers=2, cpus_per_worker=0.5, max_failures=debug.pop("max_failures", 2)),
        debug=dict(log_keys=True, deterministic=True, **debug),
    ))


def _keys(run_dir: str) -> dict[tuple[int, int], dict]:
    fs, path = storage.get_fs(run_dir)
    out = {}
    for rank in (0, 1):
        for f in fs.ls(f"{path}/keys/rank{rank}", detail=False):
            rec = json.loads(fs.cat_file(f))
            out[(rank, rec["step"])] = rec
    return out


def _final_state(run_dir: str) -> dict[str, torch.Tensor]:
    ckpt = storage.join(run_dir, f"step_{N:08d}")
    assert validate_checkpoint(ckpt), ckpt
    state = read_model_tensors(ckpt)
    trainer = torch.load(io.BytesIO(storage.read_bytes(storage.join(ckpt, TRAINER_FILE))),
                         weights_only=True)
    for gi, st in trainer["optimizer"]["state"].items():
        for k, v in st.items():
            state[f"optim.{gi}.{k}"] = v
    return state


def test_worker_failure_and_job_restart_resume_exactly(synthetic_shards, s3_bucket):
    root = f"{s3_bucket}/runs"
    fit(_config(synthetic_shards, root, "straight"))

    # B: rank 1 dies after step 5; Ray restarts the worker group from the step-4 checkpoint.
    result = fit(_config(synthetic_shards, root, "worker-killed", fail_at_step=N // 2 + 1, fail_rank=1))
    assert result.error is None

    # C: the job dies (no retries), then the same command is run again with the same name.
    cfg_c = _config(synthetic_shards, root, "job-restarted", fail_at_step=N // 2 + 1, max_failures=0)
    with pytest.raises(Exception):
        fit(cfg_c)
    stopped = _keys(storage.join(root, "job-restarted"))
    assert max(step for _, step in stopped) == N // 2 + 1, "the first attempt should stop right after step 5"
    fit(cfg_c)

    ref_state = _final_state(storage.join(root, "straight"))
    ref_keys = _keys(storage.join(root, "straight"))
    assert sorted(ref_keys) == [(r, s) for r in (0, 1) for s in range(1, N + 1)]
    for name in ("worker-killed", "job-restarted"):
        run = storage.join(root, name)
        state = _final_state(run)
        assert state.keys() == ref_state.keys()
        diff = [k for k in ref_state if not torch.equal(ref_state[k], state[k])]
        assert not diff, f"{name}: {len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:5]}"
        keys = _keys(run)
        assert {k: v["keys"] for k, v in keys.items()} == {k: v["keys"] for k, v in ref_keys.items()}, name
    # Momentum twins and ITC queues are part of the compared state.
    assert any(k.startswith("momentum.") for k in ref_state) and any("queue" in k for k in ref_state)

    # No sample is seen twice within an epoch of its corpus, across both ranks.
    seen = Counter()
    for rec in ref_keys.values():
        for key, corpus, epoch in zip(rec["keys"], rec["corpora"], rec["epochs"]):
            seen[(corpus, epoch, key)] += 1
    assert max(seen.values()) == 1
    # The lost step was really redone: B and C both logged a fault marker and finished at step N.
    for name in ("worker-killed", "job-restarted"):
        assert storage.exists(storage.join(root, name, f".fault_injected_step{N // 2 + 1}"))
        ck = load_checkpoint(storage.join(root, name, f"step_{N:08d}"), restore_rng=False)
        assert ck.step == N


def test_resume_never_refuses_an_existing_run(synthetic_shards, s3_bucket):
    cfg = _config(synthetic_shards, f"{s3_bucket}/runs", "exists")
    storage.atomic_write(storage.join(cfg.storage, cfg.run_name, "checkpoint_manager_snapshot.json"), b"{}")
    cfg.resume = "never"
    with pytest.raises(FileExistsError, match="already exists"):
        fit(cfg)
