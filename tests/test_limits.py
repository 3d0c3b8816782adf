"""Rate limits over HTTP: requests per minute and generated tokens per minute per key, per
client address with auth off, and shared by two gunicorn workers through a real Redis."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import services
from tests.conftest import gunicorn, in_threads, served, tiny_config, wait_healthy
from tests.services import free_port
from textgen.auth.keystore import KeyStore


@pytest.fixture(scope="module")
def limited(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("limits")
    database = f"sqlite:///{root / 'textgen.db'}"
    store = KeyStore(database)
    keys = {
        "five": store.create("five", rpm=5),
        "tokens": store.create("tokens", tpm=24),
        "plain": store.create("plain"),
    }
    config = tiny_config(model_dirs, root / "cache", AUTH="api_key", DATABASE_URL=database)
    with served(config) as url:
        yield url, keys


def call(url: str, key: str | None, path: str = "/generate", **body: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    defaults = {"prompt": "Hi", "max_new_tokens": 2} if path == "/generate" else {}
    payload = {**defaults, **body}
    return requests.post(f"{url}{path}", json=payload, headers=headers, timeout=60)


def test_requests_per_minute_per_key(limited: tuple[str, dict[str, str]]) -> None:
    url, keys = limited
    answers = [call(url, keys["five"]) for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 5
    assert [a.headers["X-RateLimit-Remaining"] for a in answers[:5]] == ["4", "3", "2", "1", "0"]
    assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"5"}
    assert "Retry-After" not in answers[0].headers
    for refused in answers[5:]:
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "requests_per_minute")
    # Other keys have their own counters (and this one has no limit).
    assert all(call(url, keys["plain"]).status_code == 200 for _ in range(7))


def test_tokens_per_minute_refuse_before_compute(limited: tuple[str, dict[str, str]]) -> None:
    url, keys = limited
    key = keys["tokens"]  # 24 generated tokens per minute
    ten = {"max_tokens": 10, "ignore_eos": True, "model": "tiny-llama", "prompt": "Hi"}
    first = call(url, key, "/v1/completions", **ten)
    assert first.status_code == 200
    assert first.json()["usage"]["completion_tokens"] == 10
    assert first.headers["X-RateLimit-Remaining-Tokens"] == "14"
    # Streamed: its tokens are counted when it ends.
    with requests.post(
        f"{url}/v1/completions", json={**ten, "stream": True},
        headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=60,
    ) as streamed:  # fmt: skip
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    refused = call(url, key, "/v1/completions", **ten)  # 4 left, it may generate 10
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "tokens_per_minute"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "4"
    assert call(url, key, max_new_tokens=4, ignore_eos=True).status_code == 200
    assert call(url, key, max_new_tokens=1).status_code == 429  # nothing left
    # More than the whole minute's budget: it can never run, and says which field to lower.
    too_big = call(url, key, max_new_tokens=30)
    assert too_big.status_code == 429
    assert too_big.json()["error"]["param"] == "max_tokens"
    assert "Retry-After" not in too_big.headers


@pytest.fixture(scope="module")
def anonymous(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    config = tiny_config(model_dirs, tmp_path_factory.mktemp("anon"), RATE_LIMIT_RPM=3)
    with served(config) as url:
        yield url


def test_auth_off_limits_each_client_address(anonymous: str) -> None:
    answers = [call(anonymous, None).status_code for _ in range(5)]
    assert answers == [200, 200, 200, 429, 429]
    # Health and docs are never limited (a load balancer polls them).
    assert all(requests.get(f"{anonymous}/health", timeout=30).status_code == 200 for _ in range(5))
    assert requests.get(f"{anonymous}/openapi.json", timeout=30).status_code == 200


def test_two_workers_share_the_counts_through_redis(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    database = f"sqlite:///{tmp_path / 'textgen.db'}"
    key = KeyStore(database).create("shared", rpm=5)
    with services.redis() as redis_url:
        port = free_port()
        env = {
            "TEXTGEN_MODELS": json.dumps(
                [{"name": "tiny-llama", "source": str(model_dirs["tiny-llama"])}]
            ),
            "TEXTGEN_MODEL_CACHE": str(tmp_path / "cache"),
            "TEXTGEN_BIND": f"127.0.0.1:{port}",
            "TEXTGEN_TORCH_THREADS": "1",
            "TEXTGEN_AUTH": "api_key",
            "TEXTGEN_DATABASE_URL": database,
            "TEXTGEN_RATE_LIMIT_STORAGE": redis_url,
            "GUNICORN_WORKERS": "2",
        }
        log = tmp_path / "gunicorn.log"
        process = gunicorn(env, log=log.open("w"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(process, url, 180, in_a_row=20)
            headers = {"Authorization": f"Bearer {key}"}

            def info() -> requests.Response:
                return requests.get(f"{url}/info", headers=headers, timeout=60)

            answers = in_threads([info] * 10)
            assert sorted(a.status_code for a in answers) == [200] * 5 + [429] * 5
            pids = {a.json()["pid"] for a in answers if a.status_code == 200}
            keys = subprocess.run(
                ["redis-cli", "-u", redis_url, "--scan", "--pattern", "*shared*"],
                capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            assert keys, "the counter is in Redis"
        finally:
            process.terminate()
            process.wait(timeout=90)
        assert key not in log.read_text()
        print("workers that answered:", pids)
