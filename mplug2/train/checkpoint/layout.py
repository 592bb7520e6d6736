"""What a checkpoint folder is called and holds: file names, format version, provenance (config hash, code).

One place for these facts; the commit protocol (:mod:`.commit`), the state files (:mod:`.snapshot`,
:mod:`.load`) and the FSDP2 files (:mod:`.dcp`) all name files through here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
from typing import Any

import torch

from mplug2 import storage

FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, MANIFEST_FILE = "model.safetensors", "trainer_state.pt", "manifest.json"
DCP_METADATA = ".metadata"       # torch DCP's coordinator file; rank files are ``__{rank}_0.distcp``
STEP_PREFIX = "step_"            # checkpoint folders of a run: ``<run>/step_NNNNNNNN``


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def data_file(rank: int) -> str:
    return f"data_rank{rank}.json"


def done_file(rank: int) -> str:
    return f"done_rank{rank}.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, inconsistent, or made for a different configuration."""


def read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


def config_hash(config: Any) -> str:
    """sha256 of a config (dict, dataclass-as-dict, or an already computed hash string)."""
    if isinstance(config, str):
        return config
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _code_version() -> tuple[tuple[str, Any], ...]:
    return tuple(_read_code_version().items())


def code_version() -> dict[str, Any]:
    """git sha and dirty flag of the source tree, torch and ray versions (ray read from metadata, not imported).
    Read once per process (two ``git`` calls): the code this process runs does not change under it."""
    return dict(_code_version())


def _read_code_version() -> dict[str, Any]:
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    return {"git_sha": sha, "git_dirty": bool(status) if sha else None, "torch": torch.__version__, "ray": ray_version}
