"""Offline validation of cluster/: every shipped YAML passes; each class of mistake fails, naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.validate_cluster import expand, image_problem, main, scan_secrets, validate_file

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHIPPED = expand([CLUSTER])


def test_all_shipped_files_are_found() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in SHIPPED}
    assert {"aws.yaml", "gcp.yaml", "local.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml",
            "kuberay/cronjob-preprocess.yaml", "kuberay/raycronjob-preprocess.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_shipped_yaml_passes(path: Path) -> None:
    report = validate_file(path)
    assert report.ok, report.errors


def test_cli_validates_cluster_dir(capsys) -> None:
    assert main(["validate", str(CLUSTER)]) == 0
    assert f"{len(SHIPPED)}/{len(SHIPPED)} files valid" in capsys.readouterr().out


def write(tmp_path: Path, name: str, data, header: str = "") -> Path:
    path = tmp_path / name
    docs = data if isinstance(data, list) else [data]
    path.write_text(header + yaml.safe_dump_all(docs, sort_keys=False))
    return path


def load(name: str) -> list:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def errors_of(tmp_path: Path, name: str, data, header: str = "") -> str:
    report = validate_file(write(tmp_path, name, data, header))
    assert not report.ok, f"{name} should fail"
    return "\n".join(report.errors)


# ----------------------------------------------------------------------------------------------- launcher

def _aws() -> dict:
    return load("aws.yaml")[0]


def test_gpu_type_without_resources_fails(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 96}
    assert "'gpu_worker' has GPUs (InstanceType p4d.24xlarge) but no explicit resources with GPU" in errors_of(
        tmp_path, "aws.yaml", cfg)


def test_gpu_type_missing_resources_key_fails_in_rays_schema(tmp_path: Path) -> None:
    cfg = _aws()
    del cfg["available_node_types"]["gpu_worker"]["resources"]
    text = errors_of(tmp_path, "aws.yaml", cfg)
    assert "ray validate_config: 'resources' is a required property" in text
    assert "no explicit resources with GPU" in text


def test_latest_tag_fails(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["docker"]["image"] = "rayproject/ray-ml:latest-gpu"
    assert "docker.image: image 'rayproject/ray-ml:latest-gpu' uses a floating tag" in errors_of(
        tmp_path, "aws.yaml", cfg)
    cfg["docker"]["image"] = "rayproject/ray"
    assert "has no tag" in errors_of(tmp_path, "aws.yaml", cfg)


def test_min_greater_than_max_fails(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["available_node_types"]["cpu_worker"]["min_workers"] = 20
    cfg["available_node_types"]["cpu_worker"]["max_workers"] = 2
    assert "node type 'cpu_worker': min_workers 20 > max_workers 2" in errors_of(tmp_path, "aws.yaml", cfg)


def test_sum_of_min_workers_above_global_max_fails(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["available_node_types"]["cpu_worker"]["min_workers"] = 16
    cfg["available_node_types"]["gpu_worker"]["min_workers"] = 4
    assert validate_file(write(tmp_path, "ok.yaml", cfg)).ok  # 20 <= 20
    cfg["max_workers"] = 19
    assert "sum of per-type min_workers (20) > global max_workers (19)" in errors_of(tmp_path, "aws.yaml", cfg)


def test_public_dashboard_fails(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
    assert "dashboard exposed publicly (--dashboard-host=0.0.0.0)" in errors_of(tmp_path, "aws.yaml", cfg)


def test_omitted_start_commands_get_rays_public_default_and_fail(tmp_path: Path) -> None:
    """Ray's AWS defaults start the head with --dashboard-host=0.0.0.0: the prepared config is what we check."""
    cfg = _aws()
    del cfg["head_start_ray_commands"]
    assert "--dashboard-host=0.0.0.0" in errors_of(tmp_path, "aws.yaml", cfg)


def test_secret_in_file_fails(tmp_path: Path) -> None:
    cfg = _aws()
    key_id = "AKIA" + "Z7EXAMPLEQ2ABCDE"
    cfg["setup_commands"].append(f"export AWS_ACCESS_KEY_ID={key_id}")
    assert "AWS access key id in file" in errors_of(tmp_path, "aws.yaml", cfg)
    secret = "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert "AWS secret access key" in errors_of(tmp_path, "aws2.yaml", _aws(), header=f"# {secret}\n")


def test_unknown_key_fails_in_rays_own_validator(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["max_worker"] = 3
    assert "ray validate_config: Additional properties are not allowed ('max_worker'" in errors_of(
        tmp_path, "aws.yaml", cfg)


def test_head_type_must_exist(tmp_path: Path) -> None:
    cfg = _aws()
    cfg["head_node_type"] = "nope"
    assert "`head_node_type` must be one of `available_node_types`" in errors_of(tmp_path, "aws.yaml", cfg)


def test_gcp_gpu_type_detected_by_accelerators(tmp_path: Path) -> None:
    cfg = load("gcp.yaml")[0]
    cfg["available_node_types"]["gpu_worker"]["resources"].pop("GPU")
    assert "'gpu_worker' has GPUs (guestAccelerators)" in errors_of(tmp_path, "gcp.yaml", cfg)


@pytest.mark.parametrize("image,pinned", [
    ("rayproject/ray:2.60.0-py311-gpu", True), ("rayproject/ray@sha256:" + "a" * 64, True),
    ("localhost:5000/mplug2-ray:0.1.0-ray2.60.0-py311-cpu", True), ("rayproject/ray:latest", False),
    ("localhost:5000/ray", False), ("rayproject/ray:nightly-gpu", False), ("rayproject/ray:gpu", False),
])
def test_image_pinning(image: str, pinned: bool) -> None:
    assert (image_problem(image) is None) is pinned


def test_scan_secrets_ignores_auth_mode_and_comments_about_tokens() -> None:
    assert scan_secrets("RAY_AUTH_MODE=token ray start\n# set a token here\nenv: {name: RAY_AUTH_MODE}") == []


# ------------------------------------------------------------------------------------------------- KubeRay

def test_raycluster_loadbalancer_and_gpu_without_limit_fail(tmp_path: Path) -> None:
    docs = load("kuberay/raycluster.yaml")
    rc = docs[0]
    rc["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    gpu = rc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]
    gpu["limits"].pop("nvidia.com/gpu")
    text = errors_of(tmp_path, "rc.yaml", docs)
    assert "head serviceType LoadBalancer exposes the dashboard" in text
    assert "workerGroupSpecs[gpu-workers]: GPU group without an nvidia.com/gpu limit" in text


def test_raycluster_replicas_and_autoscaling(tmp_path: Path) -> None:
    rc = load("kuberay/raycluster.yaml")[0]
    rc["spec"]["enableInTreeAutoscaling"] = False
    g = rc["spec"]["workerGroupSpecs"][0]
    g.update(minReplicas=5, maxReplicas=2, replicas=3)
    text = errors_of(tmp_path, "rc.yaml", rc)
    assert "enableInTreeAutoscaling must be true" in text
    assert "workerGroupSpecs[cpu-workers]: minReplicas 5 > maxReplicas 2" in text


def test_raycluster_schema_rejects_typos_and_wrong_types(tmp_path: Path) -> None:
    rc = load("kuberay/raycluster.yaml")[0]
    g = rc["spec"]["workerGroupSpecs"][0]
    g["minReplica"] = g.pop("minReplicas")
    rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    rc["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    text = errors_of(tmp_path, "rc.yaml", rc)
    assert "'minReplicas' is a required property" in text
    assert "Additional properties are not allowed ('minReplica' was unexpected)" in text
    assert "spec/headGroupSpec/rayStartParams/num-cpus: 0 is not of type 'string'" in text
    assert "'Fast' is not one of" in text


def test_raycluster_latest_image_and_version_mismatch(tmp_path: Path) -> None:
    rc = load("kuberay/raycluster.yaml")[0]
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:latest"
    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.59.0-py311"
    text = errors_of(tmp_path, "rc.yaml", rc)
    assert "uses a floating tag 'latest'" in text
    assert "does not carry rayVersion 2.60.0" in text


def test_literal_credential_env_fails(tmp_path: Path) -> None:
    rc = load("kuberay/raycluster.yaml")[0]
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})
    assert "env AWS_SECRET_ACCESS_KEY has a literal value" in errors_of(tmp_path, "rc.yaml", rc)


def test_rayjob_recovery_settings(tmp_path: Path) -> None:
    job = load("kuberay/rayjob-pretrain.yaml")[0]
    job["spec"]["backoffLimit"] = 1
    job["spec"]["entrypoint"] = "python -m jobs.pretrain --config configs/pretrain_base.yaml"
    del job["spec"]["activeDeadlineSeconds"]
    job["spec"]["shutdownAfterJobFinishes"] = False
    text = errors_of(tmp_path, "job.yaml", job)
    assert "backoffLimit 1 < 2" in text
    assert "entrypoint has no --run-name" in text
    assert "activeDeadlineSeconds missing" in text
    assert "shutdownAfterJobFinishes must be true" in text
    job = load("kuberay/rayjob-pretrain.yaml")[0]
    job["spec"]["entrypoint"] += "-$(date +%s)"
    assert "is not stable (templated)" in errors_of(tmp_path, "job.yaml", job)


def test_wrong_api_version_fails(tmp_path: Path) -> None:
    job = load("kuberay/rayjob-pretrain.yaml")[0]
    job["apiVersion"] = "ray.io/v1alpha1"
    assert "apiVersion 'ray.io/v1alpha1'; KubeRay >= 1.0 serves ray.io/v1" in errors_of(tmp_path, "job.yaml", job)


def test_cronjob_rules(tmp_path: Path) -> None:
    cj = load("kuberay/cronjob-preprocess.yaml")[0]
    cj["spec"]["concurrencyPolicy"] = "Allow"
    del cj["spec"]["startingDeadlineSeconds"]
    args = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    args.remove("--date-id")
    text = errors_of(tmp_path, "cj.yaml", cj)
    assert "concurrencyPolicy must be Forbid" in text
    assert "startingDeadlineSeconds missing" in text
    assert "no date-derived submission id" in text


def test_raycronjob_must_be_marked_alpha(tmp_path: Path) -> None:
    docs = load("kuberay/raycronjob-preprocess.yaml")
    assert "RayCronJob is alpha" in errors_of(tmp_path, "rcj.yaml", docs)  # safe_dump drops the comments
    report = validate_file(write(tmp_path, "rcj2.yaml", docs, header="# alpha: feature gate RayCronJob\n"))
    assert report.ok, report.errors


def test_cli_reports_problem_and_exit_code(tmp_path: Path, capsys) -> None:
    cfg = _aws()
    cfg["docker"]["image"] = "rayproject/ray:latest"
    bad = write(tmp_path, "bad.yaml", cfg)
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "floating tag 'latest'" in out
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
