"""Which executor a run uses, and whether there is a Ray cluster to use (Ray's own address-file rules).

Nothing here starts or imports Ray: ``--executor auto`` must decide without paying Ray's start-up.
"""

from __future__ import annotations

import os
import sys

from pipelines.config import PreprocessConfig


def choose_executor(config: PreprocessConfig) -> str:
    """``ray`` or ``local`` for ``config.executor`` (``auto``: Ray when there is a Ray cluster to use,
    i.e. :func:`ray_cluster_available`; otherwise a local process pool, which on one machine does the same
    work without Ray's start-up and shutdown, several seconds of a short run's wall time)."""
    if config.executor != "auto":
        return config.executor
    if config.has_model_stages:  # model stages are Ray actor pools
        return "ray"
    return "ray" if ray_cluster_available(config.ray_address) else "local"


def ray_cluster_available(address: str | None = None) -> bool:
    """True when a Ray cluster is there to use: an address (``--ray-address`` / ``RAY_ADDRESS``), a
    ``ray job submit`` driver, a process where Ray is already initialised, or a cluster started with
    ``ray start`` on this machine (its address file and a live GCS process). Never starts or imports Ray."""
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray for a job's driver
        return True
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return True
    return local_ray_started()


def local_ray_started() -> bool:
    """A cluster joined with ``ray start`` on this machine (what ``ray.init()`` without an address would
    connect to): the address file ``ray start`` writes (``ray stop`` removes it) names a GCS that answers."""
    if os.environ.get("RAY_TMPDIR"):
        tmp = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        tmp = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        tmp = "/tmp"
    else:
        import tempfile

        tmp = tempfile.gettempdir()
    try:
        with open(os.path.join(tmp, "ray", "ray_current_cluster")) as f:
            address = f.read().strip()
    except OSError:
        return False
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    import socket

    try:  # a cluster killed without `ray stop` leaves the file behind, but nothing listens there
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False
