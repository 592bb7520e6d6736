"""Every config file and job module that the docs, cluster manifests and job wrappers name actually exists,
so a copied command never fails on a typo."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("docs/*.md"), REPO / "README.md",
                  *REPO.glob("jobs/*.py"), *REPO.glob("configs/*.yaml")])


def _refs(pattern: str) -> list[tuple[str, str]]:
    out = []
    for src in SOURCES:
        for m in re.finditer(pattern, src.read_text()):
            out.append((str(src.relative_to(REPO)), m.group(1)))
    return sorted(set(out))


@pytest.mark.parametrize("src,ref", _refs(r"\b(configs/[\w./-]+\.ya?ml)\b"))
def test_named_config_files_exist(src, ref):
    assert (REPO / ref).exists(), f"{src} names {ref}, which does not exist"


@pytest.mark.parametrize("src,module", _refs(r"python -m (jobs\.\w+|mplug2\.[\w.]+|pipelines\.\w+)"))
def test_named_job_modules_exist(src, module):
    assert importlib.util.find_spec(module) is not None, f"{src} runs {module}, which does not exist"
