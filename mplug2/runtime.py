"""Process-level settings every entry point applies before Ray, transformers or S3 clients start.

- Ray listeners bind to 127.0.0.1 on a local cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``);
- one explicit ``RAY_AUTH_MODE`` for ``ray start``, ``ray.init`` and ``ray job submit`` (token auth is on by
  default in Ray 2.60 once ``~/.ray/auth_token`` exists, and a mismatch fails with AuthenticationError);
- no model hub access (``HF_HUB_OFFLINE``): weights come from local files only.

Values already set in the environment win, so a production cluster can choose differently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import Any

DEFAULT_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Credential values: never put into a runtime_env (Ray writes runtime envs to its logs in plain text).
# Workers get credentials from their node's environment (a local Ray started by the driver inherits it), an
# instance role / service account, or a 0600 credentials file named by path (CREDENTIAL_FILE_ENV).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CREDENTIAL_FILE_ENV = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")

# Variables forwarded to Ray workers (runtime_env env_vars): endpoint, region, where credentials are, offline flags.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", *CREDENTIAL_FILE_ENV,
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "FFMPEG_BINARY",
    "SOURCE_DATE_EPOCH",
)


# Ray's longest Unix socket path below its temp dir: the session folder (date, time, microseconds, a pid of up to 7
# digits), then the dashboard's longest per-module socket. Linux caps a socket path at 107 bytes; past that the
# dashboard's modules die at start ("Module MetricsHead failed to start") and Ray prints a traceback.
_RAY_SOCKET_TAIL = len("/session_2026-12-02_07-39-56_694432_4194304/sockets/dash_MetricsHead")
UNIX_SOCKET_PATH_MAX = 107


def ray_temp_dir_fits(path: str) -> bool:
    """Whether a Ray temp dir at ``path`` keeps every socket Ray makes below it within the kernel's limit."""
    return len(os.path.abspath(path).encode()) + _RAY_SOCKET_TAIL <= UNIX_SOCKET_PATH_MAX


def local_ray_temp_dir(name: str) -> str:
    """``<system temp folder>/<name>`` for a local Ray's temp dir, or ``/tmp/<name>`` when a long ``TMPDIR``
    (a CI runner's, a test's) would push Ray's sockets past the kernel's limit."""
    import tempfile

    path = os.path.join(tempfile.gettempdir(), name)
    return path if ray_temp_dir_fits(path) else os.path.join("/tmp", name)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (``torch.distributed`` rendezvous for local process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_process_env() -> None:
    """Apply :data:`DEFAULT_ENV` where unset. Idempotent."""
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


def forwarded_env() -> dict[str, str]:
    """The subset of the current environment Ray workers need (S3 endpoint, credentials file path, offline
    flags); never a credential value (:data:`SECRET_ENV`)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def _job_env_vars() -> dict[str, str]:
    """``env_vars`` of the runtime_env this process was submitted with as a Ray job (empty outside a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             object_store_memory: int | None = None, temp_dir: str | None = None,
             include_dashboard: bool | None = None, **kwargs: Any):
    """Connect to a Ray cluster (``address``/``RAY_ADDRESS``), or start a local one on 127.0.0.1.

    A no-op when Ray is already initialised (e.g. inside a ``ray job submit`` driver).
    """
    if temp_dir is not None and not ray_temp_dir_fits(temp_dir):
        raise ValueError(f"Ray temp dir {temp_dir!r} is too long: Ray's Unix sockets below it would pass the "
                         f"{UNIX_SOCKET_PATH_MAX}-byte limit; choose a folder of at most "
                         f"{UNIX_SOCKET_PATH_MAX - _RAY_SOCKET_TAIL} characters (e.g. under /tmp)")
    setup_process_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    user_env = kwargs.pop("runtime_env", None)
    runtime_env = user_env or {}
    # Inside a `ray job submit` driver the job's runtime_env already reaches every worker, and Ray refuses a
    # ray.init runtime_env that sets any of the job's env var keys again (even to the same value).
    job_env = _job_env_vars()
    forwarded = {k: v for k, v in forwarded_env().items() if k not in job_env}
    env_vars = {**forwarded, **runtime_env.get("env_vars", {})}
    runtime_env = {**runtime_env, "env_vars": env_vars}
    logging.getLogger(__name__).info("ray.init(address=%s)", address or "local")
    if address:
        kwargs.setdefault("log_to_driver", True)
        return ray.init(address=address, runtime_env=runtime_env, **kwargs)
    # A local cluster is started by this process, so its workers inherit this environment already.
    # A job-level runtime_env would make Ray discard the prestarted workers and start new ones
    # (measured: first tasks 1.78 s instead of 0.42 s), so pass only what the caller asked for.
    # The dashboard (on 127.0.0.1 only) serves the state API that Ray Train's placement-group cleaner polls;
    # without it the cleaner logs "Failed to query Ray Train Controller actor state" every few seconds.
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    from ray._common.utils import get_default_ray_temp_dir

    if temp_dir is None:
        temp_dir = get_default_ray_temp_dir()
        if not ray_temp_dir_fits(temp_dir):
            logging.getLogger(__name__).warning(
                "Ray's default temp dir %s is too long for its Unix sockets (%d bytes max); using /tmp/ray",
                temp_dir, UNIX_SOCKET_PATH_MAX)
            temp_dir = "/tmp/ray"
    with _tmpdir_for_children(os.path.join(temp_dir, "tmp")):
        return ray.init(
            num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=include_dashboard,
            _temp_dir=temp_dir, runtime_env=user_env, **kwargs,
        )


@contextlib.contextmanager
def _tmpdir_for_children(path: str):
    """``TMPDIR`` for the processes a local ``ray.init`` spawns (dashboard, agents, workers): their temporary
    files (e.g. the dashboard's multiprocessing ``pymp-*`` folder, left behind when Ray kills it) stay in Ray's
    own temp folder instead of the system one. This process's own ``TMPDIR`` is restored afterwards."""
    import tempfile

    os.makedirs(path, exist_ok=True)
    saved_env, saved_cached = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = path
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        tempfile.tempdir = saved_cached
