"""API keys over HTTP: missing, malformed, wrong-scheme, revoked and valid keys; per-key models;
the openai client with and without a key; only hashes stored; no key in the logs."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.conftest import served, tiny_config


@pytest.fixture(scope="module")
def secured(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("auth")
    database = root / "data" / "textgen.db"
    config = tiny_config(
        model_dirs, root / "cache", AUTH="api_key", DATABASE_URL=f"sqlite:///{database}"
    )
    with served(config) as url:
        yield url, database


def cli(database: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TEXTGEN_DATABASE_URL": f"sqlite:///{database}"}
    return subprocess.run(
        [sys.executable, "-m", "textgen", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def keys(secured: tuple[str, Path]) -> dict[str, str]:
    _, database = secured
    made = {}
    for name, extra in (("alice", []), ("llama-only", ["--models", "tiny-llama"]), ("old", [])):
        result = cli(database, "create", name, *extra)
        assert result.returncode == 0, result.stderr
        made[name] = result.stdout.strip()
    assert cli(database, "revoke", "old").returncode == 0
    return made


def post(url: str, key: str | None, path: str = "/generate", **body: Any) -> requests.Response:
    headers = {} if key is None else {"Authorization": key}
    return requests.post(f"{url}{path}", json={"prompt": "Hi", "max_new_tokens": 2, **body},
                         headers=headers, timeout=60)  # fmt: skip


def test_keys_decide_who_generates(secured: tuple[str, Path], keys: dict[str, str]) -> None:
    url, _ = secured
    alice = keys["alice"]
    for header in (None, "", "Bearer", f"Basic {alice}", alice, f"Bearer {alice}x",
                   "Bearer tg-nonsense", f"Bearer {keys['old']}"):  # fmt: skip
        response = post(url, header)
        assert response.status_code == 401, header
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert post(url, f"Bearer {alice}").status_code == 200
    assert post(url, f"bearer {alice}").status_code == 200  # the scheme is case-insensitive


def test_open_routes_and_closed_ones(secured: tuple[str, Path]) -> None:
    url, _ = secured
    for path in ("/health", "/livez", "/readyz", "/openapi.json", "/docs", "/redoc"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 200, path
    for path in ("/models", "/strategies", "/v1/models", "/tokenizer_info"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401, path
    # /info answers the anonymous with its version only: no paths, settings or process.
    assert requests.get(f"{url}/info", timeout=30).json() == {"version": "0.1.0"}


def test_a_key_limited_to_one_model(secured: tuple[str, Path], keys: dict[str, str]) -> None:
    url, _ = secured
    key = f"Bearer {keys['llama-only']}"
    assert post(url, key, model="tiny-llama").status_code == 200
    other = post(url, key, model="tiny-gpt2")
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "model_not_allowed"
    tokenize = requests.post(
        f"{url}/tokenize",
        json={"prompt": "Hi", "model": "tiny-gpt2"},
        headers={"Authorization": key},
        timeout=30,
    )
    assert tokenize.status_code == 403


def test_the_openai_client_with_and_without_a_key(
    secured: tuple[str, Path], keys: dict[str, str]
) -> None:
    url, _ = secured
    with openai.OpenAI(base_url=f"{url}/v1", api_key=keys["alice"], max_retries=0) as client:
        out = client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
        assert out.choices
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)


def test_only_hashes_are_stored_and_listing_shows_no_key(
    secured: tuple[str, Path], keys: dict[str, str]
) -> None:
    _, database = secured
    with sqlite3.connect(database) as db:
        stored = " ".join(str(v) for row in db.execute("SELECT * FROM api_keys") for v in row)
    for key in keys.values():
        assert key not in stored and key.split(".", 1)[1] not in stored
    listing = json.loads(cli(database, "list", "--json").stdout)
    assert {row["name"]: row["revoked"] for row in listing} == {
        "alice": False,
        "llama-only": False,
        "old": True,
    }
    assert not any(key in json.dumps(listing) for key in keys.values())
    assert cli(database, "create", "alice").returncode != 0  # names are unique


def test_no_key_reaches_the_logs(
    secured: tuple[str, Path], keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = secured
    with caplog.at_level(logging.DEBUG):
        post(url, f"Bearer {keys['alice']}")
        post(url, f"Bearer {keys['alice']}x")
    assert not any(key in caplog.text for key in keys.values())
