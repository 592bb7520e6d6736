"""Shared fixtures: one real SeaweedFS S3 server and one local Ray per test session.

Both bind to 127.0.0.1 and are stopped at session end. Tests that need S3 take ``s3_bucket`` (a unique
``s3://`` prefix); tests that need Ray take ``ray_local``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from mplug2.runtime import setup_process_env

setup_process_env()


def _own_temp_entries() -> set[str]:
    """This project's entries in the temp folder (``mplug2-*``), the test session's own scratch folder aside."""
    root = tempfile.gettempdir()
    return {os.path.join(root, n) for n in os.listdir(root)
            if n.startswith("mplug2-") and not n.startswith("mplug2-tests-")}


@pytest.fixture(scope="module", autouse=True)
def no_leftover_temp_files(request):
    """Every test module leaves the temp folder as it found it: a staging checkpoint, a log copy or a media
    download that outlives its run is a leak on a user's machine (each run would add one). Checked per module,
    after its own fixtures have ended (some run several trainings in the background across its tests, whose
    folders are alive until then); fails naming the module and removes what it left, so the next starts clean."""
    before = _own_temp_entries()
    yield
    left = sorted(_own_temp_entries() - before)
    for path in left:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    assert not left, f"{request.module.__name__} left these in the temp folder: {left}"


@pytest.fixture(scope="session")
def scratch_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mplug2-tests-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(scratch_root):
    """A real SeaweedFS S3 endpoint; its client env vars are exported for the whole session."""
    from mplug2.s3server import S3Server, apply_client_env, restore_env

    srv = S3Server(root=scratch_root / "s3", buckets=("mplug2",))
    srv.start()
    saved = apply_client_env(srv)
    yield srv
    srv.stop()
    restore_env(saved)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh ``s3://mplug2/<uuid>`` prefix on the session's S3 server."""
    return f"s3://mplug2/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray (2 CPUs, small object store) whose workers see the S3 env vars.

    While it is up this process is a Ray driver: a driver whose raylet or GCS dies is ended by Ray's core worker
    with ``_exit(1)``, which takes the session down without a traceback or summary. Shutting it down after its
    last user instead of at session end was tried and not kept: a Ray Data thread a test left running then
    started a new local Ray on its own (docs/benchmarks.md, stop 25). Never fork this process (spawn instead)."""
    import ray

    from mplug2.runtime import init_ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    init_ray(num_cpus=2, object_store_memory=512 << 20, temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)

