"""The node types of ``cluster/aws.yaml`` on Ray's fake multi-node provider: a preprocessing job adds CPU
workers, a GPU-requesting batch-inference job adds a GPU worker from zero, idle workers are removed.

Every worker node is a real raylet on this machine (``fake_multinode``), so the node types are scaled down:
the test keeps each worker type's name, ``min_workers`` / ``max_workers``, its GPU count (fake GPUs: the
inference actor holds the GPU resource and runs on CPU torch, ``--device auto``) and custom resources, the
cluster's ``max_workers`` and ``upscaling_speed``; it gives every node 1 CPU and a small object store, the head
0 CPUs (so all work lands on workers; drivers need none) and sets a short idle timeout.
``ray.cluster_utils.AutoscalingCluster`` is not used: its ``start()`` runs ``ray stop --force``, which would stop
every Ray on the machine, and its template ``example.yaml`` is not in Ray's wheel. The head is started here with
``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config`` on 127.0.0.1, with its own temp dir, and exactly its
processes (session, temp dir, descendants) are stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.ops.conftest import REPO, RAY, _kill_tree, free_ports

pytestmark = pytest.mark.slow

AWS_YAML = REPO / "cluster" / "aws.yaml"
IDLE_TIMEOUT_MIN = 0.1          # 6 s instead of the YAML's minutes
SMALL_STORE = 80 << 20          # object store per fake node (Ray's minimum is 75 MiB)


def fake_node_types(cluster_yaml: Path) -> tuple[dict, str, str]:
    """``(autoscaling config, cpu worker type, gpu worker type)`` built from a cluster-launcher YAML."""
    cfg = yaml.safe_load(cluster_yaml.read_text())
    head = cfg["head_node_type"]
    workers = {name: t for name, t in cfg["available_node_types"].items() if name != head}
    gpu = [n for n, t in workers.items() if t.get("resources", {}).get("GPU", 0) > 0]
    cpu = [n for n, t in workers.items() if not t.get("resources", {}).get("GPU", 0)]
    assert len(gpu) == 1 and len(cpu) == 1, f"{cluster_yaml}: expected one CPU and one GPU worker type"
    types = {head: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in workers.items():
        extra = {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU", "memory")}
        types[name] = {"resources": {"CPU": 1, "GPU": t["resources"].get("GPU", 0), **extra,
                                     "object_store_memory": SMALL_STORE},
                       "node_config": {}, "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
    lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    config = {
        "cluster_name": f"{cfg['cluster_name']}-fake", "max_workers": cfg["max_workers"],
        "upscaling_speed": cfg.get("upscaling_speed", 1.0), "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "available_node_types": types, "head_node_type": head, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in lists},
    }
    return config, cpu[0], gpu[0]


@dataclass
class NodeWatcher:
    """Polls the GCS for alive nodes and records (seconds, cpu workers, gpu workers) whenever they change."""

    gcs_address: str
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def counts(self) -> tuple[int, int]:
        from ray._raylet import GcsClient

        nodes = GcsClient(address=self.gcs_address).get_all_node_info(timeout=10).values()
        alive = [n for n in nodes if n.state == 0 and not n.is_head_node]
        gpu = sum(1 for n in alive if n.resources_total.get("GPU", 0) > 0)
        return len(alive) - gpu, gpu

    def start(self) -> None:
        t0 = time.monotonic()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    cpu, gpu = self.counts()
                except Exception:  # the GCS briefly busy: the next poll records it
                    cpu = gpu = -1
                if cpu >= 0 and (not self.timeline or self.timeline[-1][1:] != (cpu, gpu)):
                    self.timeline.append((round(time.monotonic() - t0, 1), cpu, gpu))
                self._stop.wait(0.5)

        threading.Thread(target=loop, daemon=True, name="node-watcher").start()

    def stop(self) -> None:
        self._stop.set()

    def mark(self) -> int:
        return len(self.timeline)

    def peak(self, since: int = 0) -> tuple[int, int]:
        seen = self.timeline[max(0, since - 1):]
        return max(c for _, c, _ in seen), max(g for _, _, g in seen)

    def wait_for(self, predicate, what: str, deadline_s: float = 180.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.timeline and predicate(*self.timeline[-1][1:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; nodes seen: {self.timeline}")


def _start_head(config: dict, temp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """``ray start --head`` with the fake provider on fresh free ports; returns (starter, gcs address, output)."""
    gcs, client, agent_http, agent_grpc, metrics, renv, node_mgr, obj_mgr = free_ports(8)
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    (temp / "autoscaling.json").write_text(json.dumps(config))
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--autoscaling-config={temp / 'autoscaling.json'}", f"--temp-dir={temp}", "--num-cpus=0", "--num-gpus=0",
           f"--object-store-memory={SMALL_STORE}", "--include-dashboard=false", "--disable-usage-stats",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={renv}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
    starter = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    out, _ = starter.communicate(timeout=180)
    return starter, f"127.0.0.1:{gcs}", out


@pytest.fixture
def fake_cluster():
    """A fake multi-node autoscaling head from ``cluster/aws.yaml``; yields (gcs address, env, cpu, gpu types)."""
    config, cpu_type, gpu_type = fake_node_types(AWS_YAML)
    temp = Path(tempfile.mkdtemp(prefix="rfake", dir="/tmp"))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    starter = None
    try:
        starter, gcs, out = _start_head(config, temp, env)
        if starter.returncode != 0:
            # `ray start` gives the raylet a fixed 30 s to register and then exits, leaving the processes running;
            # on a saturated shared machine registration can take longer: wait for it here instead.
            if "timed out during startup" not in out:
                raise RuntimeError(f"ray start failed ({starter.returncode}):\n{out}")
            _wait_for_head(gcs, deadline_s=180, logs=temp / "session_latest" / "logs")
        # The drivers below join this cluster, never another one.
        yield gcs, {**env, "RAY_ADDRESS": gcs}, cpu_type, gpu_type
    finally:
        # The fake provider's worker raylets are children of the head's autoscaler: same session, same temp dir.
        _kill_tree(starter.pid if starter is not None else -1, str(temp))   # -1: by temp dir alone
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_head(gcs_address: str, deadline_s: float, logs: Path) -> None:
    from ray._raylet import GcsClient

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            nodes = GcsClient(address=gcs_address).get_all_node_info(timeout=10).values()
            if any(n.state == 0 and n.is_head_node for n in nodes):
                return
        except Exception:  # GCS not answering yet
            pass
        time.sleep(1)
    tails = "".join(f"\n--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                    for p in sorted(logs.glob("*")) if p.name in ("raylet.out", "raylet.err", "gcs_server.out",
                                                                  "gcs_server.err", "monitor.log", "monitor.err"))
    raise RuntimeError(f"the head at {gcs_address} did not register within {deadline_s:.0f} s{tails}")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_cluster_yaml_node_types_scale_up_from_zero_and_back(fake_cluster, tmp_path):
    import torch

    from mplug2.config import MPLUG2Config
    from mplug2.inference.index import read_index
    from mplug2.models.mplug2 import MPLUG2
    from pipelines.synthetic import make_image_corpus

    gcs, env, cpu_type, gpu_type = fake_cluster
    watcher = NodeWatcher(gcs)
    watcher.start()
    try:
        watcher.wait_for(lambda c, g: c == 0 and g == 0, "the cluster to start with no workers")

        # 1. preprocessing: shard tasks need CPUs, the head has none -> CPU workers are added
        manifest = make_image_corpus(tmp_path / "src", 9, seed=4, size=32)
        shards = tmp_path / "shards"
        _run([sys.executable, "-m", "jobs.preprocess", "--manifest", str(manifest), "--output", str(shards),
              "--modality", "image", "--samples-per-shard", "3", "--image-size", "32"], env)
        cpu_peak, gpu_peak = watcher.peak()
        assert cpu_peak >= 1 and gpu_peak == 0, watcher.timeline

        # 2. batch inference asking for a GPU per actor -> a GPU worker from zero (fake GPU, CPU torch)
        torch.manual_seed(0)
        model = MPLUG2(MPLUG2Config.preset("tiny")).save_pretrained(tmp_path / "model")
        before = watcher.mark()
        assert watcher.timeline[-1][2] == 0, watcher.timeline
        infer = _run([sys.executable, "-m", "jobs.infer", "embed", "--model", str(model), "--shards", str(shards),
              "--output", str(tmp_path / "emb"), "--gpus-per-worker", "1", "--cpus-per-worker", "1",
              "--max-workers", "1", "--device", "auto", "--no-progress"], env)
        assert watcher.peak(before)[1] >= 1, watcher.timeline
        if not torch.cuda.is_available():   # the actor held a (fake) GPU and fell back to CPU torch
            assert "torch sees no CUDA device: running on CPU" in infer.stdout + infer.stderr, infer.stderr[-3000:]
        index = read_index(str(tmp_path / "emb"))
        assert sorted(set(index.modalities)) == ["image", "text"] and len(index) == 2 * 9

        # 3. idle workers of both types are removed after the idle timeout
        watcher.wait_for(lambda c, g: c == 0 and g == 0, "idle workers to be removed")
    finally:
        watcher.stop()
        print(f"\nnode counts over time ({cpu_type}, {gpu_type}), from {AWS_YAML.name}:")
        for t, c, g in watcher.timeline:
            print(f"  {t:7.1f} s   {cpu_type} {c}   {gpu_type} {g}")
