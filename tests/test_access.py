"""Host checks against DNS rebinding, and CORS for listed origins only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import served, tiny_config
from textgen.api.access import host_name


def test_host_names() -> None:
    assert host_name("localhost:8000") == "localhost"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("api.example") == "api.example"


@pytest.fixture(scope="module")
def guarded(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = tiny_config(
        model_dirs,
        tmp_path_factory.mktemp("access"),
        ALLOWED_HOSTS="127.0.0.1,api.example",
        CORS_ORIGINS="https://app.example",
    )
    with served(config) as url:
        yield url


def test_only_listed_hosts_are_served(guarded: str) -> None:
    assert requests.get(f"{guarded}/health", timeout=30).status_code == 200
    ok = requests.get(f"{guarded}/health", headers={"Host": "api.example:443"}, timeout=30)
    assert ok.status_code == 200
    evil = requests.post(
        f"{guarded}/generate", json={"prompt": "Hi"}, headers={"Host": "evil.example"}, timeout=30
    )
    assert evil.status_code == 400
    assert evil.json()["error"]["code"] == "host_not_allowed"
    # Probes come by the pod's address or any name: they are answered whatever the Host.
    for probe in ("/livez", "/readyz", "/health"):
        answer = requests.get(f"{guarded}{probe}", headers={"Host": "10.1.2.3:8000"}, timeout=30)
        assert answer.status_code == 200, probe
    models = requests.get(f"{guarded}/models", headers={"Host": "10.1.2.3:8000"}, timeout=30)
    assert models.status_code == 400


def test_cors_for_listed_origins_only(guarded: str) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    allowed = requests.options(f"{guarded}/v1/chat/completions", headers=preflight, timeout=30)
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
    other = requests.options(
        f"{guarded}/v1/chat/completions",
        headers={**preflight, "Origin": "https://evil.example"},
        timeout=30,
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    response = requests.post(
        f"{guarded}/tokenize",
        json={"prompt": "Hi"},
        headers={"Origin": "https://app.example"},
        timeout=30,
    )
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]


def test_no_cors_by_default(live: str) -> None:
    response = requests.post(
        f"{live}/tokenize",
        json={"prompt": "Hi"},
        headers={"Origin": "https://app.example"},
        timeout=30,
    )
    assert "Access-Control-Allow-Origin" not in response.headers
