"""``mplug2-cluster validate``: offline checks for cluster launcher YAMLs and KubeRay manifests.

``ray up`` has no dry run and ``kubectl apply --dry-run=server`` needs a live cluster, so mistakes surface as
idle GPUs or a public dashboard. We run Ray's own validator (``prepare_config`` + ``validate_config``, as Ray's
``test_autoscaler_yaml.py`` does) and a JSON schema derived from the KubeRay CRD types, then the project rules
(training-and-ops.md §6): GPU node types declare their GPUs, images are pinned, the dashboard stays private,
no credentials in files, and RayJob/CronJob settings that make driver-level recovery work.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "cluster"
KUBERAY_SCHEMA = CLUSTER_DIR / "kuberay" / "schemas" / "kuberay.schema.yaml"

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Instance families with GPUs/accelerators (AWS) whose node types must declare resources.GPU explicitly.
AWS_GPU_FAMILIES = re.compile(r"^(p\d\w*|g\d\w*|gr\d\w*)\.", re.I)

SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("AWS secret access key", re.compile(
        r"aws_secret_access_key\W{0,4}[:=]\s*[\"']?[A-Za-z0-9/+=]{40}", re.I)),
    ("private key", re.compile(r"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----")),
    ("GCP service account key", re.compile(r"[\"']?private_key_id[\"']?\s*:")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("password/secret/token value", re.compile(
        r"(password|passwd|secret|api[_-]?key|auth[_-]?token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=_\-]{16,}", re.I)),
)
SECRET_ENV_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|ACCESS_KEY|SESSION_TOKEN|PRIVATE_KEY|API_KEY)", re.I)


@dataclass
class Report:
    """Problems found in one file; ``errors`` block a deploy, ``warnings`` are worth reading."""

    path: str
    kind: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ----------------------------------------------------------------------------------------------- shared


def ray_validators() -> tuple[Callable[[dict], dict], Callable[[dict], None]]:
    """Ray's private ``prepare_config`` and ``validate_config``; a clear error if a Ray upgrade moved them."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # pragma: no cover - depends on the installed Ray
        import ray

        raise RuntimeError(
            f"ray {ray.__version__}: ray.autoscaler._private.util.prepare_config/validate_config not importable "
            f"({e}); these private helpers moved - update jobs/validate_cluster.py for this Ray version"
        ) from e
    return prepare_config, validate_config


def scan_secrets(text: str) -> list[str]:
    """Credential-looking strings in a file's raw text (comments included: a pasted key is a key)."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for label, pattern in SECRET_PATTERNS:
            if pattern.search(line):
                found.append(f"line {lineno}: {label} in file; credentials come from instance roles / service "
                             f"accounts or the submitting environment, never from files")
                break
    return found


def image_problem(image: str) -> str | None:
    """Why ``image`` is not pinned to a version, or None. Digests count as pinned."""
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if not tag:
        return f"image {image!r} has no tag (means 'latest'); pin a version, e.g. rayproject/ray:2.60.0-py311-gpu"
    if "latest" in tag.lower() or "nightly" in tag.lower():
        return f"image {image!r} uses a floating tag {tag!r}; pin a version"
    if not re.search(r"\d+\.\d+", tag):
        return f"image {image!r}: tag {tag!r} carries no version number"
    return None


def _walk_strings(obj: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, str):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_strings(v, f"{where}[{i}]")


def dashboard_exposures(obj: Any) -> list[str]:
    """Every ``--dashboard-host`` (or ``dashboard-host`` start param) that is not loopback."""
    out = []
    for where, s in _walk_strings(obj):
        for m in re.finditer(r"--dashboard-host(?:=|\s+)[\"']?([^\s\"';]+)", s):
            if m.group(1) not in LOOPBACK:
                out.append(f"{where}: dashboard exposed publicly (--dashboard-host={m.group(1)}); bind it to "
                           f"127.0.0.1 and use `ray dashboard <yaml>` (SSH tunnel)")
    return out


# ---------------------------------------------------------------------------------------- cluster launcher


def _is_gpu_type(node: dict) -> str | None:
    """Why a node type has GPUs (instance type, accelerators, declared GPU), or None."""
    cfg = node.get("node_config") or {}
    itype = str(cfg.get("InstanceType", ""))
    if AWS_GPU_FAMILIES.match(itype):
        return f"InstanceType {itype}"
    if cfg.get("guestAccelerators"):
        return "guestAccelerators"
    if cfg.get("acceleratorType") or cfg.get("accelerator_type"):
        return "TPU/accelerator node_config"
    if (node.get("resources") or {}).get("GPU", 0) > 0:
        return "resources.GPU"
    return None


def check_launcher(raw: dict) -> tuple[list[str], list[str]]:
    """Ray's validator plus our rules on a cluster launcher config (already parsed)."""
    errors: list[str] = []
    warnings: list[str] = []
    prepare_config, validate_config = ray_validators()
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # "setting max workers for head ..." noise
    prepared: dict | None = None
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, ValueError, KeyError, click aborts ...
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        path = "/".join(str(p) for p in getattr(e, "absolute_path", []) or [])
        errors.append(f"ray validate_config: {msg}" + (f" (at {path})" if path else ""))
    except SystemExit as e:  # cli_logger.abort on local provider misconfiguration
        errors.append(f"ray prepare_config aborted: {e}")

    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    global_max = raw.get("max_workers")
    mins = 0
    for name, node in types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers")
        if name != head:
            mins += lo
        if hi is not None and lo > hi:
            errors.append(f"node type {name!r}: min_workers {lo} > max_workers {hi}")
        if name != head and hi is None:
            warnings.append(f"node type {name!r}: no max_workers; it may take the whole global max_workers")
        if global_max is not None and hi is not None and hi > global_max and name != head:
            warnings.append(f"node type {name!r}: max_workers {hi} exceeds global max_workers {global_max}")
        gpu_reason = _is_gpu_type(node)
        resources = node.get("resources")
        if gpu_reason and not (isinstance(resources, dict) and resources.get("GPU", 0) > 0):
            errors.append(f"node type {name!r} has GPUs ({gpu_reason}) but no explicit resources with GPU; "
                          f"declare resources: {{CPU: .., GPU: .., memory: ..}}")
        if name == head and gpu_reason:
            warnings.append(f"head node type {name!r} has GPUs ({gpu_reason}); the head should be a CPU node")
        if gpu_reason and name != head:
            cfg = node.get("node_config") or {}
            spot = (cfg.get("InstanceMarketOptions") or {}).get("MarketType") == "spot" or any(
                isinstance(s, dict) and (s.get("preemptible") or s.get("provisioningModel") == "SPOT")
                for s in (cfg.get("scheduling") or []))
            if not spot:
                warnings.append(f"GPU node type {name!r} is on-demand; spot/preemptible is cheaper and checkpoints "
                                f"make preemptions safe")
        if name != head and lo > 0 and gpu_reason:
            warnings.append(f"GPU node type {name!r} keeps {lo} node(s) up while idle (min_workers > 0)")
    if global_max is not None and mins > global_max:
        errors.append(f"sum of per-type min_workers ({mins}) > global max_workers ({global_max})")
    if "min_workers" in raw:
        warnings.append("top-level min_workers is deprecated; set min_workers per node type")
    if "idle_timeout_minutes" not in raw:
        warnings.append("no idle_timeout_minutes: idle workers (GPUs!) stay up for Ray's default")

    docker = raw.get("docker") or {}
    images = [(f"docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for name, node in types.items():
        for k in ("worker_image", "head_image", "image"):
            if (node.get("docker") or {}).get(k):
                images.append((f"available_node_types.{name}.docker.{k}", node["docker"][k]))
    for where, image in images:
        problem = image_problem(str(image))
        if problem:
            errors.append(f"{where}: {problem}")

    errors.extend(dashboard_exposures(prepared if prepared is not None else raw))
    modes = {m for _, s in _walk_strings({k: raw.get(k) for k in ("head_start_ray_commands",
                                                                  "worker_start_ray_commands")})
             for m in re.findall(r"RAY_AUTH_MODE=(\w+)", s)}
    if len(modes) > 1:
        errors.append(f"RAY_AUTH_MODE differs between start commands ({sorted(modes)}); use one mode everywhere")
    provider = raw.get("provider") or {}
    if provider.get("type") == "gcp" and not provider.get("project_id"):
        warnings.append("provider.project_id is not set; `ray up` needs your GCP project id")
    return errors, warnings


# ------------------------------------------------------------------------------------------------- KubeRay


def _load_schema() -> dict:
    return yaml.safe_load(KUBERAY_SCHEMA.read_text())


def _schema_errors(schema: dict, key: str, instance: Any) -> list[str]:
    import jsonschema

    ref = schema["kinds"][key]
    sub = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": ref}
    validator = jsonschema.Draft202012Validator(sub)
    out = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"spec/{path}: {err.message}")
    return out


def _containers(template: dict) -> list[dict]:
    spec = (template or {}).get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def _check_pod(where: str, template: dict, errors: list[str], ray_version: str | None = None) -> None:
    for c in _containers(template):
        image = str(c.get("image", ""))
        problem = image_problem(image) if image else f"container {c.get('name')!r} has no image"
        if problem:
            errors.append(f"{where}: {problem}")
        elif ray_version and ray_version not in image.rsplit(":", 1)[-1]:
            errors.append(f"{where}: image {image!r} does not carry rayVersion {ray_version} in its tag")
        for env in c.get("env") or []:
            if SECRET_ENV_NAME.search(str(env.get("name", ""))) and "value" in env:
                errors.append(f"{where}: env {env['name']} has a literal value; use valueFrom.secretKeyRef or "
                              f"IRSA / Workload Identity")


def check_ray_cluster_spec(where: str, spec: dict, errors: list[str], warnings: list[str]) -> None:
    """Autoscaling, replica bounds, GPU limits, pinned images, private head service."""
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}: enableInTreeAutoscaling must be true (workers scale from 0)")
    if not spec.get("autoscalerOptions"):
        errors.append(f"{where}: autoscalerOptions missing (idleTimeoutSeconds, upscalingMode, version)")
    ray_version = spec.get("rayVersion")
    if not ray_version:
        errors.append(f"{where}: rayVersion missing (KubeRay uses it to build the submitter command)")
    head = spec.get("headGroupSpec") or {}
    stype = head.get("serviceType") or ((head.get("headService") or {}).get("spec") or {}).get("type")
    if stype in ("LoadBalancer", "NodePort"):
        errors.append(f"{where}: head serviceType {stype} exposes the dashboard/job server; use ClusterIP and "
                      f"kubectl port-forward")
    if head.get("enableIngress"):
        errors.append(f"{where}: headGroupSpec.enableIngress exposes the dashboard; remove it")
    _check_pod(f"{where}.headGroupSpec", head.get("template") or {}, errors, ray_version)
    for g in spec.get("workerGroupSpecs") or []:
        gw = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
        for key, value in (("minReplicas", lo), ("maxReplicas", hi), ("replicas", n)):
            if value is None:
                errors.append(f"{gw}: {key} missing")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errors.append(f"{gw}: minReplicas {lo} > maxReplicas {hi}")
        if all(isinstance(v, int) for v in (lo, hi, n)) and not lo <= n <= hi:
            errors.append(f"{gw}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
        containers = _containers(g.get("template") or {})
        wants_gpu = "gpu" in str(g.get("groupName", "")).lower() or any(
            "nvidia.com/gpu" in ((c.get("resources") or {}).get("requests") or {}) for c in containers)
        has_limit = any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {}) for c in containers)
        if wants_gpu and not has_limit:
            errors.append(f"{gw}: GPU group without an nvidia.com/gpu limit (Ray would see no GPUs and the "
                          f"scheduler would not place the pod on a GPU node)")
        _check_pod(gw, g.get("template") or {}, errors, ray_version)


def check_ray_job_spec(where: str, spec: dict, errors: list[str], warnings: list[str]) -> None:
    """A RayJob recovers at driver level only with retries and a stable run name (kuberay#2153)."""
    entry = str(spec.get("entrypoint") or "")
    m = re.search(r"--run-name[=\s]+(\S+)", entry)
    if not entry:
        errors.append(f"{where}: entrypoint missing")
    elif not m:
        errors.append(f"{where}: entrypoint has no --run-name; a retried driver must resume the same run")
    elif re.search(r"[$`{}]", m.group(1)):
        errors.append(f"{where}: --run-name {m.group(1)!r} is not stable (templated); a retry would start a new run")
    if not spec.get("submissionMode"):
        errors.append(f"{where}: submissionMode missing (K8sJobMode recommended)")
    if spec.get("shutdownAfterJobFinishes") is not True and not spec.get("clusterSelector"):
        errors.append(f"{where}: shutdownAfterJobFinishes must be true (else GPU clusters outlive the job)")
    if (spec.get("backoffLimit") or 0) < 2:
        errors.append(f"{where}: backoffLimit {spec.get('backoffLimit', 0)} < 2; a head-pod loss kills the driver "
                      f"(kuberay#2153), retries with the same run name resume it")
    if not spec.get("activeDeadlineSeconds"):
        errors.append(f"{where}: activeDeadlineSeconds missing; a stuck job would hold its cluster forever")
    if spec.get("rayClusterSpec"):
        check_ray_cluster_spec(f"{where}.rayClusterSpec", spec["rayClusterSpec"], errors, warnings)
    elif not spec.get("clusterSelector"):
        errors.append(f"{where}: neither rayClusterSpec nor clusterSelector")
    if spec.get("runtimeEnvYAML"):
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"]) or {}
        except yaml.YAMLError as e:
            errors.append(f"{where}: runtimeEnvYAML does not parse: {e}")
        else:
            for key in (env.get("env_vars") or {}):
                if SECRET_ENV_NAME.search(key):
                    errors.append(f"{where}: runtimeEnvYAML env_vars.{key} is a credential")


def check_cronjob(where: str, spec: dict, errors: list[str], warnings: list[str]) -> None:
    if spec.get("concurrencyPolicy") != "Forbid":
        errors.append(f"{where}: concurrencyPolicy must be Forbid (two submitters for one corpus race)")
    for key in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        if spec.get(key) is None:
            errors.append(f"{where}: {key} missing")
    template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
    containers = _containers(template)
    argv = " ".join(" ".join(map(str, (c.get("command") or []) + (c.get("args") or []))) for c in containers)
    if not ("--date-id" in argv or re.search(r"\$\(date\b", argv)):
        errors.append(f"{where}: no date-derived submission id (mplug2-submit --date-id); a re-run tick could "
                      f"start a duplicate instead of meeting the status check")
    _check_pod(f"{where}.jobTemplate", template, errors)


def check_k8s(docs: Sequence[Any], text: str) -> tuple[list[str], list[str], list[str]]:
    """Schema + rules per document; returns (kinds, errors, warnings)."""
    schema = _load_schema()
    errors: list[str] = []
    warnings: list[str] = []
    kinds = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            errors.append(f"document {i}: not a mapping")
            continue
        api, kind = doc.get("apiVersion"), doc.get("kind")
        name = (doc.get("metadata") or {}).get("name", "?")
        where = f"{kind}/{name}"
        kinds.append(str(kind))
        if kind in ("RayCluster", "RayJob", "RayCronJob") and api != "ray.io/v1":
            errors.append(f"{where}: apiVersion {api!r}; KubeRay >= 1.0 serves ray.io/v1")
            continue
        key = f"{api}/{kind}"
        if key in schema["kinds"]:
            import jsonschema

            meta = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/metadata"})
            errors.extend(f"{where}: metadata: {e.message}" for e in meta.iter_errors(doc.get("metadata") or {}))
            errors.extend(f"{where}: {e}" for e in _schema_errors(schema, key, doc.get("spec") or {}))
        spec = doc.get("spec") or {}
        if kind == "RayCluster":
            check_ray_cluster_spec(where, spec, errors, warnings)
        elif kind == "RayJob":
            check_ray_job_spec(where, spec, errors, warnings)
        elif kind == "RayCronJob":
            if not re.search(r"^\s*#.*\balpha\b", text, re.I | re.M):
                errors.append(f"{where}: RayCronJob is alpha (feature gate RayCronJob, KubeRay >= 1.6); say so in a "
                              f"comment")
            check_ray_job_spec(f"{where}.jobTemplate", spec.get("jobTemplate") or {}, errors, warnings)
        elif key == "batch/v1/CronJob":
            check_cronjob(where, spec, errors, warnings)
        elif kind == "Service":
            if spec.get("type") in ("LoadBalancer", "NodePort"):
                errors.append(f"{where}: Service type {spec['type']} exposes Ray ports; use ClusterIP")
        elif kind == "NetworkPolicy" and api == "networking.k8s.io/v1":
            pass
        else:
            warnings.append(f"{where}: {api}/{kind} is not checked by mplug2-cluster")
    return kinds, errors, warnings


# ---------------------------------------------------------------------------------------------- entry


def validate_file(path: str | Path) -> Report:
    """Detect the file type (launcher config or Kubernetes manifests) and run every check."""
    path = Path(path)
    text = path.read_text()
    report = Report(str(path), "unknown")
    try:
        docs = [d for d in yaml.safe_load_all(text)]
    except yaml.YAMLError as e:
        report.errors.append(f"YAML does not parse: {e}")
        return report
    report.errors.extend(scan_secrets(text))
    docs = [d for d in docs if d is not None]
    if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0] and "apiVersion" not in docs[0]:
        report.kind = f"cluster-launcher/{docs[0]['provider'].get('type', '?')}"
        errors, warnings = check_launcher(docs[0])
    elif docs and all(isinstance(d, dict) and "apiVersion" in d for d in docs):
        kinds, errors, warnings = check_k8s(docs, text)
        report.kind = "k8s/" + ",".join(kinds)
    else:
        errors, warnings = ["neither a cluster launcher config (has `provider`) nor Kubernetes manifests"], []
    report.errors.extend(errors)
    report.warnings.extend(warnings)
    return report


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories become their *.yaml files (schemas excluded)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*.y*ml") if "schemas" not in f.parts))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(p)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mplug2-cluster",
        description="Offline validation of cluster launcher YAMLs (Ray's prepare_config + validate_config plus "
                    "project rules) and KubeRay manifests (schema from the CRD types plus project rules). "
                    "Run it before `ray up` or `kubectl apply`.",
        epilog="exit codes: 0 all files valid, 1 problems found, 2 usage error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate files or directories (default: the repository's cluster/)")
    v.add_argument("paths", nargs="*", default=[str(CLUSTER_DIR)])
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.add_argument("--strict", action="store_true", help="treat warnings as errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        files = expand(args.paths)
    except FileNotFoundError as e:
        print(f"mplug2-cluster: error: no such file or directory: {e}", file=sys.stderr)
        return 2
    reports = [validate_file(f) for f in files]
    failed = [r for r in reports if r.errors or (args.strict and r.warnings)]
    if args.json:
        print(json.dumps([r.__dict__ | {"ok": r.ok} for r in reports], indent=2))
    else:
        for r in reports:
            print(f"{'FAIL' if r in failed else 'ok  '} {r.path} [{r.kind}]")
            for e in r.errors:
                print(f"  error: {e}")
            for w in r.warnings:
                print(f"  warning: {w}")
        print(f"{len(reports) - len(failed)}/{len(reports)} files valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
