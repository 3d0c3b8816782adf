"""gunicorn with gunicorn.conf.py and wsgi.py, on the embedded model, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import EMBEDDED_CACHE, REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gunicorn(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TEXTGEN_", "GUNICORN_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "wsgi:app"],
        cwd=REPO,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    process = gunicorn(
        {"TEXTGEN_BIND": f"127.0.0.1:{port}", "TEXTGEN_MODEL_CACHE": str(EMBEDDED_CACHE)}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # refused before bind, slow while loading
                pass
            time.sleep(0.25)
        else:
            pytest.fail("gunicorn did not become healthy")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_generate_over_http(server: str) -> None:
    response = requests.post(
        f"{server}/generate",
        json={"prompt": "What is the capital of France?", "chat": True, "strategy": "greedy"},
        timeout=120,
    )
    assert response.status_code == 200
    assert "Paris" in response.json()["results"][0]["outputs"][0]["text"]


def test_torch_threads_fit_the_cores(server: str) -> None:
    info = requests.get(f"{server}/info", timeout=10).json()
    assert info["torch"]["interop_threads"] == 1
    assert info["torch"]["threads"] == len(os.sched_getaffinity(0))


def test_bad_requests_do_not_kill_the_worker(server: str) -> None:
    pid = requests.get(f"{server}/info", timeout=10).json()["pid"]
    bad = [
        ("not json", {"Content-Type": "application/json"}),
        ('{"prompt": "x", "max_new_tokens": -5}', {"Content-Type": "application/json"}),
        ('{"prompt": "' + "x" * (2 << 20) + '"}', {"Content-Type": "application/json"}),
        ('{"prompt": "Hi", "model": "missing"}', {"Content-Type": "application/json"}),
    ]
    for body, headers in bad:
        response = requests.post(f"{server}/generate", data=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500
        assert "error" in response.json()
    assert requests.get(f"{server}/info", timeout=10).json()["pid"] == pid


def test_missing_model_stops_startup_with_a_message(tmp_path: Path) -> None:
    process = gunicorn(
        {
            "TEXTGEN_BIND": f"127.0.0.1:{free_port()}",
            "TEXTGEN_MODELS": str(tmp_path / "absent"),
            "TEXTGEN_MODEL_CACHE": str(tmp_path),
        }
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "no config.json" in output


def test_oversubscription_is_refused() -> None:
    cores = len(os.sched_getaffinity(0))
    process = gunicorn(
        {"GUNICORN_WORKERS": str(cores), "TEXTGEN_TORCH_THREADS": "2"}, "--check-config"
    )
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "exceeds the" in output
