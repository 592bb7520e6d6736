"""Where relative paths in configs and flags point: resolved once, on the driver, before anything ships.

Ray runs workers in their own working directories (``/tmp/ray/session_*/...``), so a relative ``storage``,
``init_from`` or corpus path reaching a worker would name a different folder on every process. The driver
makes them absolute against one base folder:

- ``$MPLUG2_WORKDIR`` when set, else the driver's working directory (where you typed the command);
- under ``ray job submit`` the driver's working directory is the job's ``working_dir``, a temporary copy
  of the repository that Ray deletes with the session. Relative *inputs* (configs, files shipped with the
  job) resolve there; a relative *output* (a run's ``storage``) is refused unless ``$MPLUG2_WORKDIR`` names
  a lasting folder, because its checkpoints would vanish with the job.

URLs (``s3://``, ``http(s)://``, ``file://``) and absolute paths are left as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKDIR_ENV = "MPLUG2_WORKDIR"


class RelativeOutputInJobError(ValueError):
    """A relative output path in a Ray job driver, whose working directory is temporary."""


def base_dir() -> Path:
    """The folder relative paths are resolved against (``$MPLUG2_WORKDIR``, else the working directory)."""
    return Path(os.environ.get(WORKDIR_ENV) or os.getcwd()).absolute()


def in_ray_job() -> bool:
    """True in the driver of a ``ray job submit`` job (Ray hands it the job's config in this variable)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def is_url(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str | None, *, field: str, output: bool = False) -> str | None:
    """``path`` made absolute against :func:`base_dir` (URLs and absolute paths unchanged)."""
    if not path or is_url(path):
        return path
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return path
    if output and in_ray_job() and not os.environ.get(WORKDIR_ENV):
        raise RelativeOutputInJobError(
            f"{field}: {path!r} is relative, and this Ray job's working directory ({os.getcwd()}) is a temporary "
            f"copy Ray deletes; set {field} to an s3:// URL or an absolute path on shared storage, or set "
            f"{WORKDIR_ENV} in the job's env_vars")
    return str(base_dir() / path)


def config_file(path: str) -> str:
    """A config named on the command line: the file if it exists (relative to the working directory), else
    the copy shipped in the package (``configs/pretrain_tiny.yaml`` or ``pretrain_tiny``), so commands that
    name ``configs/...`` work from any directory, from the wheel and in the container image."""
    if is_url(path) or os.path.exists(path):
        return path
    from importlib import resources

    name = str(path)
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    shipped = resources.files("configs").joinpath(name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise FileNotFoundError(f"config {path!r} not found in {os.getcwd()} nor among the shipped configs "
                            f"({', '.join(sorted(shipped_configs()))})")


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``configs/*.yaml``)."""
    from importlib import resources

    return [p.name for p in resources.files("configs").iterdir() if p.name.endswith(".yaml")]
