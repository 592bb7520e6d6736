"""The container image, checked without a Docker engine: the build context that .dockerignore leaves, the
layout the Dockerfile produces, and every path the KubeRay manifests name inside that image."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a context path: a pattern matches the path or one of its parent folders; ``**``
    matches any number of folders. (No ``!`` exceptions are used in our file; refuse them if added.)"""
    assert not any(p.startswith("!") for p in patterns), "extend this matcher for '!' exceptions"
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern[3:]):
                return True
    return False


def final_stage() -> tuple[str, list[str], list[str]]:
    """(WORKDIR, sources COPY'd from the context into it, all context sources COPY'd in any stage)."""
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    sources_all, workdir, final_sources = [], "", []
    for i, stage in enumerate(stages):
        for line in stage.splitlines():
            m = re.match(r"COPY\s+(?:--chown=\S+\s+)?(?!--from)(.+)\s+(\S+)$", line)
            if m:
                srcs = m.group(1).split()
                sources_all += srcs
                if i == len(stages) - 1:
                    final_sources += srcs
            if i == len(stages) - 1 and line.startswith("WORKDIR "):
                workdir = line.split()[1]
    return workdir, final_sources, sources_all


def test_build_context_excludes_environments_data_and_secrets() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".s3/credentials", ".s3/logs/weed.INFO", "outputs/runs/pt-tiny/final",
                 ".git/HEAD", "mplug2/__pycache__/x.pyc", "dist/mplug2_ray-0.1.0-py3-none-any.whl"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "mplug2/train/loop.py", "configs/pretrain_base.yaml",
                 "jobs/runtime_env/pretrain.yaml", "cluster/kuberay/raycluster.yaml"):
        assert not ignored(path, patterns), path


def test_every_copied_path_is_in_the_context() -> None:
    patterns = dockerignore_patterns()
    _, _, sources = final_stage()
    for src in sources:
        assert (REPO / src).exists() and not ignored(src, patterns), src


def test_manifest_paths_exist_in_the_image() -> None:
    workdir, final_sources, _ = final_stage()
    assert workdir == "/home/ray/mplug2-ray" and "configs" in final_sources
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"configs*"' in pyproject and '"jobs*"' in pyproject     # shipped in the wheel as package data
    manifests = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
    seen = 0
    for manifest in manifests:
        text = manifest.read_text()
        for ref in re.findall(r"\b(configs/[\w./-]+\.ya?ml)\b", text):
            seen += 1
            assert (REPO / ref).is_file(), f"{manifest.name}: {ref} is not in the image ({workdir}/{ref})"
        for module in re.findall(r"-m\s*(?:-\s*)?([a-z_]+(?:\.[a-z_]+)+)", text):
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{manifest.name}: module {module}"
        for env in re.findall(r"--runtime-env[= ](\w+)", text):
            assert (REPO / "jobs" / "runtime_env" / f"{env}.yaml").is_file(), f"{manifest.name}: {env}"
        for doc in yaml.safe_load_all(text):
            for wd in _values(doc, "workingDir"):
                assert wd == workdir, f"{manifest.name}: workingDir {wd} is not the image's {workdir}"
            for image in _values(doc, "image"):
                assert image.startswith("mplug2-ray:0.1.0-ray2.60.0-py311-"), image
    assert seen >= 3


def _values(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)
