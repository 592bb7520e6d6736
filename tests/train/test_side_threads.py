"""Side threads that run torch ops (the checkpoint's background copy, inference's decode-ahead) get no OpenMP team
of their own: on a machine whose cores the training thread's team already uses, a second team makes libgomp stop
spin-waiting for the whole process, and every training step sleeps and wakes its workers at each barrier
(measured: ~75 ms -> ~130 ms per tiny step on 2 cores; mplug2/side_threads.py). Thread counts are read in a fresh
interpreter, where nothing else has started threads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")

_PRELUDE = """
import json, os, threading, torch
torch.set_num_threads(2)                       # the training thread's team, as on a 2-core machine
a = torch.randn(4_000_000); b = torch.empty_like(a)
b.copy_(a)                                     # a parallel op: the main thread's team exists from here on
def threads():
    return len(os.listdir("/proc/self/task"))
"""


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_side_thread_runs_its_ops_without_a_team_and_changes_no_other_thread():
    got = _run("""
from mplug2.side_threads import single_threaded_torch

def side(result, limit):
    if limit:
        single_threaded_torch()
    result["own_threads"] = torch.get_num_threads()
    torch._foreach_copy_([b], [a])             # a batched copy, as the checkpoint's background copy does
    result["during"] = threads()               # the side thread still lives here
    ready.set()
    done.wait()

before = threads()
out = {"before": before}
for limit in (True, False):                    # limited first: no team of an earlier side thread lingers
    ready, done, result = threading.Event(), threading.Event(), {}
    t = threading.Thread(target=side, args=(result, limit))
    t.start()
    ready.wait()
    done.set(); t.join()
    out[str(limit)] = result
later = {}
t = threading.Thread(target=lambda: later.update(n=torch.get_num_threads())); t.start(); t.join()
out["main"], out["later"] = torch.get_num_threads(), later["n"]
print(json.dumps(out))
""")
    before = got["before"]
    # without the limit the side thread brings a team (itself and one OpenMP worker): what this guards against
    assert got["False"]["own_threads"] == 2
    assert got["False"]["during"] >= before + 2
    limited = got["True"]
    assert limited["own_threads"] == 1
    assert limited["during"] == before + 1                  # the side thread alone, no worker of its own
    assert got["main"] == 2 and got["later"] == 2           # the training thread and threads started later keep 2


def test_the_background_copy_of_a_snapshot_starts_no_openmp_worker(tmp_path):
    got = _run(f"""
from mplug2.train.checkpoint import StagingBuffers, take_snapshot
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Linear(2048, 512))
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 512)).sum().backward(); opt.step()
before = threads()
snap = take_snapshot({str(tmp_path / "ck")!r}, model=model, optimizer=opt, scheduler=None, step=1, extra={{}}, rank=0,
                     world_size=1, data_state=None, config_fingerprint="t", buffers=StagingBuffers(), overlap=True)
snap.wait_staged()
assert all(torch.equal(snap.model[k], v) for k, v in model.state_dict().items())
print(json.dumps({{"before": before, "after": threads(), "main": torch.get_num_threads()}}))
""")
    assert got["after"] == got["before"] + 1      # the copy thread alone: no OpenMP worker beside it
    assert got["main"] == 2
