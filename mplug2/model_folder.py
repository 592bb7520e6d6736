"""A model folder (``config.yaml`` + ``model.safetensors``, optionally ``head.safetensors`` with a task's own heads)
read from a local path or ``s3://``: the one reader that fine-tuning's ``init_from`` and inference share."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

import torch
from torch import Tensor

from mplug2 import storage
from mplug2.models.mplug2 import CONFIG_FILE, WEIGHTS_FILE, MPLUG2

HEAD_FILE = "head.safetensors"      # task heads exported beside the bare model (ITC/ITM, classifier)
RERANK_FILE = "rerank.json"         # retrieval: the re-rank's ITM weight, chosen on a validation corpus
_OPTIONAL = (HEAD_FILE, "classes.json", RERANK_FILE)


@contextlib.contextmanager
def local_model_folder(url: str) -> Iterator[str]:
    """The folder itself when local; a temporary copy of its model files when remote."""
    if not storage.is_remote(url):
        if not os.path.exists(os.path.join(url, WEIGHTS_FILE)):
            raise FileNotFoundError(f"{url}: no {WEIGHTS_FILE} (expected a model folder: config.yaml + "
                                    f"{WEIGHTS_FILE}, as `mplug2-model convert` or a fine-tuning run's best/ writes)")
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="mplug2-model-") as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE, *_OPTIONAL):
            src = storage.join(url, name)
            if name in _OPTIONAL and not storage.exists(src):
                continue
            storage.download_file(src, os.path.join(tmp, name))
        yield tmp


def load_model_folder(url: str, map_location: str | torch.device = "cpu") -> MPLUG2:
    """``MPLUG2.from_pretrained`` for a local or ``s3://`` folder (tied weights restored)."""
    with local_model_folder(url) as path:
        return MPLUG2.from_pretrained(path, map_location=map_location)


def read_heads(url: str) -> dict[str, Tensor]:
    """The task heads exported beside a model (``head.safetensors``), or ``{}``."""
    from safetensors.torch import load as load_safetensors

    head_url = storage.join(url, HEAD_FILE)
    if not storage.exists(head_url):
        return {}
    return load_safetensors(storage.read_bytes(head_url))


def rerank_file(itm_weight: float) -> bytes:
    """``rerank.json``'s bytes for a retrieval run's chosen ITM weight."""
    return json.dumps({"itm_weight": itm_weight}).encode()


def parse_rerank_file(raw: bytes) -> float:
    """The ITM weight in ``rerank.json``'s bytes."""
    return float(json.loads(raw)["itm_weight"])


def read_rerank_weight(url: str) -> float | None:
    """The re-rank's ITM weight a retrieval run exported beside the model (``rerank.json``), or None."""
    rerank_url = storage.join(url, RERANK_FILE)
    return parse_rerank_file(storage.read_bytes(rerank_url)) if storage.exists(rerank_url) else None
