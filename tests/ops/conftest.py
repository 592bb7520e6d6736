"""One real ``ray start --head`` on 127.0.0.1 per test session, for the job-submission tests.

``ray stop`` kills every Ray process on the machine (it matches process names, not a temp dir), and other
engineers run their own Ray here. So the head is started in a new session and torn down by PID: every process
in that session plus their descendants (job drivers run in sessions of their own under the job supervisor).
All ports are chosen free and explicit, so this head never collides with another one on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hygiene import process_table

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class RayHead:
    address: str          # dashboard / job server, http://127.0.0.1:<port>
    gcs_address: str
    temp_dir: Path
    env: dict[str, str]   # environment for CLI subprocesses talking to this head

    def run(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


def _our_processes(sid: int, marker: str) -> set[int]:
    """Processes in the head's session or naming its temp dir, plus all their descendants."""
    table = process_table()
    pids = {pid for pid, (_, s, cmd) in table.items() if s == sid or marker in cmd}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in pids:
                pids.add(child)
                stack.append(child)
    pids.discard(os.getpid())
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _kill_tree(sid: int, marker: str) -> None:
    """SIGTERM our processes, SIGKILL what is left after 10 s; never touches other Ray instances."""
    pids = _our_processes(sid, marker)
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """A real Ray head with the job server, loopback only, auth disabled, 2 CPUs."""
    temp = Path(tempfile.mkdtemp(prefix="rops", dir="/tmp"))
    (gcs, dash, client, agent_http, agent_grpc, metrics, renv, node_mgr, obj_mgr) = free_ports(9)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "",  # never fall back to someone else's cluster
        # the head's daemons and every command run with this env keep their temporary files (the dashboard's
        # multiprocessing pymp-* folder, which outlives the kill at the end) in the head's folder, removed then
        "TMPDIR": str(temp / "tmp"),
    }
    (temp / "tmp").mkdir()
    env.pop("RAY_ADDRESS")
    env.pop("RAY_API_SERVER_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--temp-dir={temp}", "--disable-usage-stats", "--num-cpus=2", "--num-gpus=0",
        f"--object-store-memory={256 << 20}", "--include-dashboard=true",
    ]
    starter = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    sid = starter.pid  # session id of everything `ray start` spawns
    head = RayHead(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp, env)
    try:
        out, _ = starter.communicate(timeout=120)
        if starter.returncode != 0:
            raise RuntimeError(f"ray start failed ({starter.returncode}):\n{out}")
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{head.address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"job server at {head.address} did not come up:\n{out}") from None
                time.sleep(0.5)
        yield head
    finally:
        _kill_tree(sid, str(temp))
        shutil.rmtree(temp, ignore_errors=True)
