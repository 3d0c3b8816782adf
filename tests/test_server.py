"""gunicorn with gunicorn.conf.py and wsgi.py, on the embedded model, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import EMBEDDED_CACHE, gunicorn, wait_healthy
from tests.services import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    process = gunicorn(
        {"TEXTGEN_BIND": f"127.0.0.1:{port}", "TEXTGEN_MODEL_CACHE": str(EMBEDDED_CACHE)}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url)
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


def engine_metrics(server: str) -> dict:
    return requests.get(f"{server}/info", timeout=10).json()["engines"]["smollm2-135m-instruct"]


def test_streaming_over_http(server: str) -> None:
    with requests.post(
        f"{server}/generate",
        json={
            "prompt": "Count from one to ten.",
            "chat": True,
            "max_new_tokens": 40,
            "stream": True,
        },
        stream=True,
        timeout=120,
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    assert sum(1 for line in lines if '"text": "' in line) > 5  # deltas, not one blob


def test_client_hanging_up_stops_a_non_streaming_request(server: str) -> None:
    before = engine_metrics(server)
    body = b'{"prompt": "Write a long essay about rivers.", "chat": true, "max_new_tokens": 500}'
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while engine_metrics(server)["generated_tokens"] <= before["generated_tokens"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The socket is closed: the handler notices, and the engine drops the request.
    deadline = time.monotonic() + 60
    while engine_metrics(server)["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.1)
    after = engine_metrics(server)
    assert after["generated_tokens"] - before["generated_tokens"] < 200
