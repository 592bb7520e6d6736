"""FSDP2 (``scale.strategy: fsdp2``) through the real training loop on 2 gloo CPU ranks.

Two spawned processes run :class:`~mplug2.train.loop.TrainLoop` with :class:`~mplug2.train.loop.LocalHooks`
(each rank's checkpoint folder is copied into one ``step_N`` folder, as Ray merges them) on the ``tiny``
pretrainer: ITC queue, momentum twins, 2 micro-batches per step, gradient clipping. Only the data loader is
replaced by deterministic in-memory batches (the loop, model, checkpoints are the production code).

1. DDP and FSDP2 from the same initial weights give the same losses for 5 steps (the first 3 from the
   issue, and the 2 after the checkpoint) and the same weights (fp32 all-reduce vs reduce-scatter: the
   summation order differs, so a tolerance: losses rtol 1e-5, weights atol 1e-4).
2. DCP save -> restore: the run resumed from the step-3 checkpoint ends at step 5 *bitwise* equal to the
   straight run (parameters, momentum twins, ITC queues and pointer, optimizer state), with the same losses;
   restoring into a fresh FSDP2 model gives back the saved step-3 state bitwise.
3. The 2-rank DCP checkpoint loads into one process without a process group (DCP re-shards): same
   tensors, same optimizer state, and training goes on.
4. ``init_from`` a FSDP2 run directory initialises a retrieval fine-tuning task with the checkpoint's weights.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug2.runtime import free_loopback_port
from mplug2.train.checkpoint import (
    DCP_METADATA, LoadedCheckpoint, find_latest_valid, list_step_checkpoints, read_model_tensors,
    validate_checkpoint,
)
from mplug2.train.config import TrainConfig

WORLD, STEPS, CKPT = 2, 5, 3
CAPTIONS = ["a man playing", "the dog is on a cat", "a woman in the video", "what is the person playing",
            "a red circle moving left", "two people talk"]


def _config(storage_root: str, name: str, strategy: str, **over) -> TrainConfig:
    d = dict(
        run_name=name, storage=storage_root, task="pretrain", seed=3, model="tiny",
        data=dict(train=[dict(name="fake", path="unused", num_frames=2)], batch_size=2),
        optim=dict(lr=1e-3, lr_vision=5e-4, warmup_steps=1, grad_accum=2, grad_clip=1.0),
        schedule=dict(total_steps=STEPS, ckpt_every_steps=CKPT, log_every_steps=1, keep_last=5),
        scale=dict(num_workers=WORLD, strategy=strategy),
        debug=dict(deterministic=True),
    )
    d.update(over)
    return TrainConfig.from_dict(d)


class FakeLoader:
    """Deterministic per-rank batches with a resumable cursor (the loop's loader interface)."""

    def __init__(self, rank: int):
        from mplug2.tokenizer import load_tokenizer

        self.rank, self.i = rank, 0
        self.tok = load_tokenizer("tiny")

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(1000 * self.rank + self.i)
        caps = [CAPTIONS[(self.i + 2 * self.rank + j) % len(CAPTIONS)] for j in range(2)]
        pixels = torch.randn(2, 3, 2, 32, 32, generator=g)
        pixels[:, (self.i + self.rank) % 3] += 2.0
        ids = torch.tensor([10 * self.rank + (self.i % 5), 10 * self.rank + 5 + (self.i % 5)])
        self.i += 1
        return {"pixels": pixels, **self.tok(caps, max_length=12), "ids": ids,
                "keys": [f"r{self.rank}-{self.i}-{j}" for j in range(2)], "epoch": 0, "corpus": "fake"}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]

    def close(self) -> None:
        pass


def _fake_loader(cfg, mcfg, rank, world_size):
    return FakeLoader(rank)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss/loss" in r:
            out[r["step"]] = r["loss/loss"]
    return out


def _full_optimizer_state(loop) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name, full tensors (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(loop.task, loop.optimizer, options=StateDictOptions(full_state_dict=True))
    return {f"{fqn}/{k}": v.detach().clone() for fqn, st in sd["state"].items() for k, v in st.items()}


def _full_model_state(loop) -> dict[str, torch.Tensor]:
    from mplug2.train import parallel

    return {k: v.detach().clone() for k, v in parallel.full_state_dict(loop.task).items()}


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from mplug2.train import build
        from mplug2.train.loop import LocalHooks, TrainLoop

        build.build_train_loader = _fake_loader
        out = Path(root) / "out"

        def run(cfg: TrainConfig):
            loop = TrainLoop(cfg, rank=rank, world_size=WORLD, device=torch.device("cpu"),
                             hooks=LocalHooks(cfg, rank))
            loop.restore()
            start = loop.step
            loop.run()
            return loop, start

        run(_config(root, "ddp", "ddp"))
        loop, _ = run(_config(root, "fsdp", "fsdp2"))
        assert type(loop.task).__name__.startswith("FSDP"), type(loop.task)
        final = _full_model_state(loop), _full_optimizer_state(loop)
        run_dir = Path(root) / "fsdp"
        # Evaluation code calls methods (encode_vision, greedy generation with the KV cache), not forward:
        # full_weights gathers every unit for it; afterwards the shards train on.
        from mplug2.train import parallel

        probe = FakeLoader(0).__next__()
        loop.task.eval()
        with torch.no_grad(), parallel.full_weights(loop.task):
            feats, _ = loop.task.model.encode_vision(probe["pixels"])
            memory, mask = loop.task.model.fused_memory(probe["pixels"], probe["input_ids"], probe["attention_mask"])
            tokens = loop.task.model.generate(memory, mask, num_beams=1)
        loop.task.train()
        after, _ = loop.train_step()
        if rank == 0:
            torch.save({"feats": feats, "tokens": tokens, "loss_after": after["loss"]}, out / "eval.pt")
        if rank == 0:
            torch.save({"model": final[0], "optim": final[1], "losses": _losses(run_dir)}, out / "straight.pt")
            os.rename(run_dir / "step_00000005", out / "straight_step5")
            os.rename(run_dir / "final", out / "straight_final")
        dist.barrier()

        # The same command again: restores step 3 (DCP, re-sharded onto fresh FSDP2 modules), runs 4 and 5.
        loop, start = run(_config(root, "fsdp", "fsdp2"))
        assert start == CKPT, start
        final = _full_model_state(loop), _full_optimizer_state(loop)

        # A fresh FSDP2 loop restored from step 3 holds exactly what was saved there.
        fresh = TrainLoop(_config(root, "fsdp", "fsdp2"), rank=rank, world_size=WORLD,
                          device=torch.device("cpu"), hooks=LocalHooks(_config(root, "fsdp", "fsdp2"), rank))
        from mplug2.train.checkpoint import load_checkpoint

        ck: LoadedCheckpoint = load_checkpoint(str(run_dir / "step_00000003"), model=fresh.task,
                                               optimizer=fresh.optimizer, scheduler=fresh.scheduler, rank=rank,
                                               world_size=WORLD)
        restored = _full_model_state(fresh), _full_optimizer_state(fresh)
        if rank == 0:
            torch.save({"model": final[0], "optim": final[1], "losses": _losses(run_dir),
                        "restored3": {"model": restored[0], "optim": restored[1], "step": ck.step,
                                      "data": ck.data_state}}, out / "resumed.pt")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    (root / "out").mkdir()
    ctx = mp.get_context("spawn")
    port = free_loopback_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(root))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "workers hung"
    assert [p.exitcode for p in procs] == [0, 0], [p.exitcode for p in procs]
    return root


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ {sorted(set(a) ^ set(b))[:5]}"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:5]}"


def test_ddp_and_fsdp2_train_the_same(runs):
    ddp, fsdp = _losses(runs / "ddp"), torch.load(runs / "out" / "straight.pt")["losses"]
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([fsdp[s] for s in sorted(fsdp)]),
                               torch.tensor([ddp[s] for s in sorted(ddp)]), rtol=1e-5, atol=1e-6)
    assert fsdp[STEPS] < fsdp[1]   # it learns
    a = read_model_tensors(str(runs / "ddp" / f"step_{STEPS:08d}"))
    b = read_model_tensors(str(runs / "out" / "straight_step5"))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"DDP vs FSDP2: losses {[ddp[s] for s in sorted(ddp)]} vs {[fsdp[s] for s in sorted(fsdp)]}; "
          f"max |weight diff| at step {STEPS}: {worst:.2e}")
    assert worst < 1e-4, worst
    moved = max((a[k].float() - read_model_tensors(str(runs / "ddp" / "step_00000003"))[k].float()).abs().max().item()
                for k in a if k.startswith("momentum."))
    assert moved > 1e-6   # the twins did move between steps 3 and 5 (the EMA runs, m=0.995)


def test_merged_checkpoint_holds_every_ranks_dcp_files(runs):
    step = runs / "fsdp" / "step_00000003"
    names = set(os.listdir(step))
    assert {DCP_METADATA, "__0_0.distcp", "__1_0.distcp", "manifest.json", "done_rank0.json", "done_rank1.json",
            "trainer_state.pt", "rng_rank0.pt", "rng_rank1.pt", "data_rank0.json", "data_rank1.json"} <= names
    assert "model.safetensors" not in names
    markers = [json.loads((step / f"done_rank{r}.json").read_text())["files"] for r in range(WORLD)]
    assert "__0_0.distcp" in markers[0] and DCP_METADATA in markers[0] and "__1_0.distcp" in markers[1]
    assert validate_checkpoint(str(step))
    (step / "__1_0.distcp").rename(step / "moved")       # a missing rank file invalidates it
    try:
        assert not validate_checkpoint(str(step))
    finally:
        (step / "moved").rename(step / "__1_0.distcp")


def test_dcp_restore_is_exact(runs):
    straight = torch.load(runs / "out" / "straight.pt")
    resumed = torch.load(runs / "out" / "resumed.pt")
    # the continued run: same losses for steps 4-5, bitwise the same state at step 5
    assert [resumed["losses"][s] for s in (4, 5)] == [straight["losses"][s] for s in (4, 5)]
    model = straight["model"]
    assert any(k.startswith("momentum.twins.") for k in model) and "itc.vision_queue" in model
    assert "itc.queue_ptr" in model and int(model["itc.queue_ptr"]) == (STEPS * 2 * 2 * WORLD) % 32
    _assert_equal(resumed["model"], model, "model at step 5")
    _assert_equal(resumed["optim"], straight["optim"], "optimizer at step 5")
    _assert_equal(read_model_tensors(str(runs / "fsdp" / "step_00000005")),
                  read_model_tensors(str(runs / "out" / "straight_step5")), "step-5 checkpoint files")
    # a fresh FSDP2 model restored from step 3 = what the step-3 checkpoint holds
    r3 = resumed["restored3"]
    assert r3["step"] == CKPT and r3["data"] == {"i": CKPT * 2}
    _assert_equal(r3["model"], read_model_tensors(str(runs / "fsdp" / "step_00000003")), "restored step 3")
    assert not torch.equal(r3["model"]["model.text.latents"], model["model.text.latents"])  # steps 4-5 moved it
    # the final export (every rank gathers, rank 0 writes) is the step-5 model
    from mplug2.models.mplug2 import MPLUG2

    exported = MPLUG2.from_pretrained(runs / "out" / "straight_final")
    _assert_equal(exported.state_dict(), {k[len("model."):]: v for k, v in model.items() if k.startswith("model.")},
                  "export")


def test_full_weights_serve_evaluation_methods(runs):
    """Methods called on FSDP2 modules inside ``parallel.full_weights`` equal the unsharded exported model."""
    from mplug2.models.mplug2 import MPLUG2

    got = torch.load(runs / "out" / "eval.pt")
    ref = MPLUG2.from_pretrained(runs / "out" / "straight_final").eval()
    probe = FakeLoader(0).__next__()
    with torch.no_grad():
        feats, _ = ref.encode_vision(probe["pixels"])
        memory, mask = ref.fused_memory(probe["pixels"], probe["input_ids"], probe["attention_mask"])
        tokens = ref.generate(memory, mask, num_beams=1)
    torch.testing.assert_close(got["feats"], feats, rtol=1e-5, atol=1e-5)
    assert got["tokens"] == tokens
    assert torch.isfinite(torch.tensor(got["loss_after"]))     # training goes on after the context


def test_two_rank_dcp_checkpoint_loads_into_one_process(runs, monkeypatch):
    from mplug2.train import build
    from mplug2.train.loop import LocalHooks, TrainLoop

    monkeypatch.setattr(build, "build_train_loader", _fake_loader)
    assert not dist.is_initialized()
    cfg = _config(str(runs), "fsdp", "fsdp2")
    with torch.random.fork_rng(devices=[]):
        loop = TrainLoop(cfg, rank=0, world_size=1, device=torch.device("cpu"), hooks=LocalHooks(cfg, 0))
        step3 = str(runs / "fsdp" / "step_00000003")
        from mplug2.train.checkpoint import load_checkpoint

        ck = load_checkpoint(step3, model=loop.task, optimizer=loop.optimizer, scheduler=loop.scheduler,
                             rank=0, world_size=1)
        assert ck.step == CKPT and ck.data_state is None      # other world size: no per-rank cursor
        saved = read_model_tensors(step3)
        _assert_equal(loop.task.state_dict(), saved, "model at world size 1")
        resumed = torch.load(runs / "out" / "resumed.pt")
        # the FSDP2 restore of step 3 and this single-process one hold the same optimizer state
        optim = _full_optimizer_state(loop)
        _assert_equal(optim, resumed["restored3"]["optim"], "optimizer at world size 1")
        loop.step = ck.step
        values, _ = loop.train_step()
        assert torch.isfinite(torch.tensor(values["loss"])) and loop.step == CKPT + 1
        loop.close()


def test_init_from_fsdp2_run_for_finetuning(runs):
    from mplug2.train import build
    from mplug2.tokenizer import load_tokenizer

    run_dir = str(runs / "fsdp")
    latest = find_latest_valid(list_step_checkpoints(run_dir))
    assert latest.endswith(f"step_{STEPS:08d}") and build.resolve_init(latest) == latest
    cfg = _config(str(runs), "ft", "fsdp2", task="retrieval", init_from=run_dir)
    mcfg = build.model_config(cfg)
    with torch.random.fork_rng(devices=[]):
        task = build.build_task(cfg, mcfg, load_tokenizer(mcfg.tokenizer), world_size=1)
        counts = build.load_init(task, run_dir)
    src = read_model_tensors(latest)
    state = task.state_dict()
    model_keys = [k for k in state if k.startswith("core.model.")]
    assert model_keys and counts["loaded"] >= len(model_keys)
    for k in model_keys:
        assert torch.equal(state[k], src[k[len("core."):]]), k
    twins = [k for k in state if k.startswith("core.momentum.twins.model.")]
    for k in twins:   # twins restart from the loaded online weights
        assert torch.equal(state[k], state["core.model." + k[len("core.momentum.twins.model."):]]), k


@pytest.mark.slow
def test_fsdp2_on_ray_train_merges_rank_folders(synthetic_shards, s3_bucket):
    """The same loop under a real local Ray TorchTrainer (2 gloo workers) writing to S3: Ray merges each
    rank's reported folder into one checkpoint that holds every rank's DCP file, ``.metadata`` included, and
    reads back (DCP files fetched from S3) with the weights the run exported."""
    from mplug2 import storage
    from mplug2.models.mplug2 import MPLUG2
    from mplug2.train.trainer import fit

    root = f"{s3_bucket}/runs"
    cfg = TrainConfig.from_dict(dict(
        run_name="fsdp-ray", storage=root, task="pretrain", seed=7,
        model={"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522}},
        data=dict(train=[dict(name="video", path=synthetic_shards["video"], num_frames=4)],
                  batch_size=4, shuffle_buffer=8, shards_in_flight=2),
        optim=dict(lr=5e-4, lr_vision=5e-4, warmup_steps=1, grad_accum=2),
        schedule=dict(total_steps=2, ckpt_every_steps=2, log_every_steps=1),
        scale=dict(num_workers=2, cpus_per_worker=0.5, max_failures=0, strategy="fsdp2"),
    ))
    fit(cfg)
    ckpt = storage.join(root, "fsdp-ray", "step_00000002")
    fs, path = storage.get_fs(ckpt)
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)}
    assert {DCP_METADATA, "__0_0.distcp", "__1_0.distcp", "manifest.json", "done_rank0.json",
            "done_rank1.json"} <= names, names
    assert validate_checkpoint(ckpt)
    tensors = read_model_tensors(ckpt)
    with storage_download(storage.join(root, "fsdp-ray", "final")) as local:
        exported = MPLUG2.from_pretrained(local).state_dict()
    _assert_equal(exported, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                  "Ray run export vs its DCP checkpoint")


def storage_download(url: str):
    """A local copy of a remote ``save_pretrained`` folder."""
    import contextlib
    import tempfile

    from mplug2 import storage

    @contextlib.contextmanager
    def cm():
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("config.yaml", "model.safetensors"):
                Path(tmp, name).write_bytes(storage.read_bytes(storage.join(url, name)))
            yield tmp
    return cm()
