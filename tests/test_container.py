"""The container image and its deployment files: the image built and run for real with podman
(deploy/container/test.sh), docker-compose.yml and its nginx upstream, and the Kubernetes
manifests validated against the API's own schemas."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from textgen.config import load_settings

KUBERNETES = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
# The oldest and the newest release kubernetes-validate 1.37.0 has schemas for.
KUBERNETES_VERSIONS = ["1.25.0", "1.37.0"]
# deploy/container/test.sh takes 1-3 minutes with the base image kept (4-6 without it); this
# bounds a build or a start that hangs.
CONTAINER_TEST_TIMEOUT_S = 1500


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str) -> dict[str, Any]:
    """The one manifest of this kind in deploy/kubernetes/."""
    found = [doc for path in MANIFESTS for doc in load_yaml(path) if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} manifests of kind {kind}"
    return found[0]


def graceful_timeout(max_timeout: str | None = None) -> int:
    """gunicorn's graceful_timeout for this TEXTGEN_MAX_TIMEOUT, as gunicorn.conf.py sets it."""
    values = {} if max_timeout is None else {"MAX_TIMEOUT": max_timeout}
    return int(load_settings(values).max_timeout) + 15


@pytest.mark.slow
def test_image_builds_serves_and_stops_cleanly() -> None:
    # Fails, not skips, where podman cannot run: the script installs it, and any step that
    # does not work (build, start, answer, health check, SIGTERM) exits non-zero.
    done = subprocess.run(
        ["deploy/container/test.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CONTAINER_TEST_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print("container test:", report)
    for key in ("build_s", "cold_start_s", "warm_start_s", "stop_during_request_s", "total_s"):
        assert isinstance(report[key], float) and report[key] >= 0, report
    # The warm start reads what the cold one prepared into the volume.
    assert report["warm_start_s"] < report["cold_start_s"], report
    assert report["worker_rss_mib"] > 0, report


def test_compose_file_wires_nginx_textgen_and_redis() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"textgen", "nginx", "redis"}
    textgen, nginx = services["textgen"], services["nginx"]
    env = textgen["environment"]
    # textgen believes forwarded headers from nginx's address, and only from it.
    assert env["TEXTGEN_TRUSTED_PROXIES"] == nginx["networks"]["textgen"]["ipv4_address"]
    assert env["TEXTGEN_RATE_LIMIT_STORAGE"] == "redis://redis:6379/0"
    assert "models:/models" in textgen["volumes"] and "models" in compose["volumes"]
    assert "ports" not in textgen  # reached through nginx
    assert int(textgen["stop_grace_period"].rstrip("s")) >= graceful_timeout()
    assert "./deploy/nginx/textgen.conf:/etc/textgen/textgen.conf:ro" in nginx["volumes"]


def test_compose_nginx_upstream_is_the_textgen_service() -> None:
    # The compose nginx rewrites the tested config's upstream line; if that line changes,
    # the rewrite must change with it.
    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["nginx"][
        "command"
    ][-1]
    expression = re.search(r"sed '([^']+)'", command)
    assert expression, command
    conf = REPO / "deploy" / "nginx" / "textgen.conf"
    rewritten = subprocess.run(
        ["sed", expression.group(1), str(conf)], capture_output=True, text=True, check=True
    ).stdout
    upstream = re.search(r"upstream textgen \{(.*?)\}", rewritten, re.S)
    assert upstream, rewritten
    assert re.findall(r"^\s*server (\S+)", upstream.group(1), re.M) == ["textgen:8000"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_kubernetes_manifests_match_the_api_schema(path: Path, version: str) -> None:
    for doc in load_yaml(path):
        # strict: a field the API does not have (a typo, a misplaced key) is an error.
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_manifests_are_the_three_expected() -> None:
    kinds = sorted(doc["kind"] for path in MANIFESTS for doc in load_yaml(path))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Service"]


def test_deployment_probes_drain_and_cache() -> None:
    deployment = manifest("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    # A first start prepares the models (the decoder's compile alone: 1.5-3.5 minutes).
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60

    env = {item["name"]: item["value"] for item in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) > 0
    drain = int(pre_stop[1]) + graceful_timeout(env.get("TEXTGEN_MAX_TIMEOUT"))
    assert pod["terminationGracePeriodSeconds"] >= drain

    # As many torch threads as cores requested (textgen would count the node's).
    assert env["TEXTGEN_TORCH_THREADS"] == container["resources"]["requests"]["cpu"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["models"] == "/models"
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == manifest("PersistentVolumeClaim")["metadata"]["name"]
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user


def test_service_selects_the_deployment_pods() -> None:
    deployment, service = manifest("Deployment"), manifest("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
