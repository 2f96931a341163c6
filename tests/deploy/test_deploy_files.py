"""The deployment files, checked without Docker or a cluster: hadolint, the Compose spec's JSON
schema, rendered Kustomize overlays against the Kubernetes API schemas; then what they must
say (probes on the real endpoints, non-root, GPU placement, settings that exist)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmcds.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = sorted((ROOT / "deploy" / "k8s" / "overlays").iterdir())
BIN = Path(sys.executable).parent
# Variables the files set that libraries read, not our settings.
FOREIGN = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: deploy/setup.sh installs it (.[dev])")
        pytest.skip(f"{name} not installed (pip install -e '.[dev]')")
    return str(path)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120)


def _rendered(overlay: Path) -> tuple[str, list[dict[str, Any]]]:
    done = _run(_tool("kubectl"), "kustomize", str(overlay))
    assert done.returncode == 0, done.stderr
    return done.stdout, [d for d in yaml.safe_load_all(done.stdout) if d]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _setting_names() -> set[str]:
    return {f"MMCDS_{name.upper()}" for name in Settings.model_fields}


def _unknown_settings(names: set[str]) -> set[str]:
    return {n for n in names if n not in _setting_names() and n not in FOREIGN}


def test_dockerfiles_pass_hadolint_and_are_multi_stage_non_root_with_healthcheck() -> None:
    files = sorted(DOCKER.glob("Dockerfile.*"))
    assert {f.name for f in files} >= {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.models"}
    done = _run(_tool("hadolint"), *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) == 2, name  # build stage + runtime
        assert re.search(r"^USER 10001", text, re.M), name
        assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M), name
        assert "torch==2.13.0" in text and "--requirement requirements.lock" in text
    assert "download.pytorch.org/whl/cpu" in (DOCKER / "Dockerfile.cpu").read_text()
    for line in (DOCKER / "requirements.lock").read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", line), line


def test_compose_file_matches_the_compose_specification() -> None:
    compose = DOCKER / "compose.yaml"
    done = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose))
    assert done.returncode == 0, done.stdout + done.stderr
    spec = yaml.safe_load(compose.read_text())
    services = spec["services"]
    assert set(services) >= {
        "mmcds", "worker", "models", "loader", "hapi", "orthanc", "postgres", "redis",
    }  # fmt: skip
    worker = services["worker"]
    assert worker["command"][0] == "worker" and "--health-port" in worker["command"]
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])
    assert worker["environment"] == services["mmcds"]["environment"]  # the same settings
    assert "mmcds ingest" in " ".join(services["loader"]["command"])  # work for the workers
    assert services["loader"]["restart"] == "no"  # one-shot
    assert "ray" in services["models"]["profiles"]
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
    env = services["mmcds"]["environment"]
    assert not _unknown_settings({k for k in env if k.startswith("MMCDS_")})
    assert env["MMCDS_FHIR_ALLOWLIST"] == '["http://hapi:8080/fhir"]'


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_to_valid_kubernetes_manifests(overlay: Path) -> None:
    text, docs = _rendered(overlay)
    done = _run(_tool("kubernetes-validate"), "--strict", "--quiet", "-", stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr

    api = _by_kind(docs, "Deployment")["mmcds"]
    pod = api["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # Draining: the pod's grace outlasts the server's own shutdown grace.
    config = next(iter(_by_kind(docs, "ConfigMap").values()))
    assert pod["terminationGracePeriodSeconds"] > float(config["data"]["MMCDS_SHUTDOWN_GRACE_S"])
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["mmcds"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "mmcds",
    }  # fmt: skip
    secret = _by_kind(docs, "Secret")["mmcds-secrets"]["stringData"]
    assert {"MMCDS_TRUSTED_ISSUERS", "backend-services-key.pem"} <= set(secret)
    # Write-back with the service's own backend-services token, its key the mounted file.
    assert config["data"]["MMCDS_WRITEBACK_AUTH"] == "smart-backend"
    assert "MMCDS_WRITEBACK_CLIENT_ID" in secret
    env = {e["name"]: e.get("value") for e in container["env"]}
    key_mount = next(m for m in container["volumeMounts"] if m["name"] == "backend-key")
    assert (
        env["MMCDS_WRITEBACK_PRIVATE_KEY"] == f"{key_mount['mountPath']}/backend-services-key.pem"
    )
    assert "MMCDS_FHIR_ALLOWLIST" in config["data"]
    names = set(config["data"]) | set(secret) | {e["name"] for e in container.get("env", [])}
    assert not _unknown_settings({n for n in names if n.startswith("MMCDS_")})
    _check_workers(docs, container)


def _check_workers(docs: list[dict[str, Any]], api: dict[str, Any]) -> None:
    """Queue workers: the same image, settings and secrets as the service, probes on the
    worker's own health port, a pod grace that outlasts the worker's grace, an autoscaler."""
    pod = _by_kind(docs, "Deployment")["mmcds-worker"]["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["args"][0] == "worker"
    port = int(worker["args"][worker["args"].index("--health-port") + 1])
    assert worker["ports"] == [{"name": "probes", "containerPort": port}]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert worker["envFrom"] == api["envFrom"]
    assert worker["image"].split(":")[0] == api["image"].split(":")[0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["MMCDS_HOST"] == "0.0.0.0"  # probes reachable from the kubelet
    api_env = {e["name"]: e.get("value") for e in api["env"]}
    assert env["MMCDS_WRITEBACK_PRIVATE_KEY"] == api_env["MMCDS_WRITEBACK_PRIVATE_KEY"]
    assert pod["terminationGracePeriodSeconds"] > float(env["MMCDS_SHUTDOWN_GRACE_S"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert worker["resources"]["requests"] and worker["resources"]["limits"]
    assert not _unknown_settings({n for n in env if n.startswith("MMCDS_")})
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["mmcds-worker"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "mmcds-worker" and hpa["minReplicas"] >= 1
    # The service's PodDisruptionBudget and Service select API pods only, never workers.
    worker_labels = _by_kind(docs, "Deployment")["mmcds-worker"]["spec"]["selector"]
    for selector in (
        _by_kind(docs, "PodDisruptionBudget")["mmcds"]["spec"]["selector"]["matchLabels"],
        _by_kind(docs, "Service")["mmcds"]["spec"]["selector"],
    ):
        assert selector["app.kubernetes.io/component"] == "api"
        assert worker_labels["matchLabels"]["app.kubernetes.io/component"] != "api"


def test_gpu_overlay_runs_the_queue_workers_on_gpu_nodes() -> None:
    overlay = next(o for o in OVERLAYS if o.name == "gpu")
    _, docs = _rendered(overlay)
    deployments = _by_kind(docs, "Deployment")
    pod = deployments["mmcds-worker"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith(":0.1.0-cuda")
    api = deployments["mmcds"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in api  # hooks answer from the store: no GPU for them
    assert api["containers"][0]["image"].endswith(":0.1.0-cpu")


def test_gpu_overlay_puts_the_model_workers_on_gpu_nodes() -> None:
    overlay = next(o for o in OVERLAYS if o.name == "gpu-ray")
    _, docs = _rendered(overlay)
    workers = _by_kind(docs, "Deployment")["mmcds-models"]["spec"]["template"]["spec"]
    assert workers["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = workers["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "mmcds serve-models --health-port 8082" in " ".join(container["args"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert {"name": "probes", "containerPort": 8082} in container["ports"]
    config = next(iter(_by_kind(docs, "ConfigMap").values()))["data"]
    assert config["MMCDS_MODEL_BACKEND"] == "ray"  # the service and its queue workers alike
    queue_worker = _by_kind(docs, "Deployment")["mmcds-worker"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in queue_worker["containers"][0]["resources"]["limits"]
    assert config["MMCDS_RAY_ADDRESS"].startswith("ray://mmcds-models")
