"""Shared fixtures: tiny models built once per session, apps and clients over them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from tests.tiny_models import save_tiny_gpt2, save_tiny_llama
from textgen import create_app

pytest_plugins = ["tests.leaks"]

REPO = Path(__file__).resolve().parent.parent
# The embedded model's conversion is kept between test runs (and CI converts it once).
EMBEDDED_CACHE = Path(os.environ.get("TEXTGEN_TEST_CACHE", REPO / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny-llama": save_tiny_llama(root / "tiny-llama"),
        "tiny-gpt2": save_tiny_gpt2(root / "tiny-gpt2"),
    }


def tiny_config(model_dirs: dict[str, Path], cache: Path, **extra: Any) -> dict[str, Any]:
    """App config serving both tiny models (tiny-llama is the default), loaded synchronously."""
    config: dict[str, Any] = {
        "MODELS": [{"name": name, "source": str(path)} for name, path in model_dirs.items()],
        "MODEL_CACHE": str(cache),
        "LOAD_MODE": "sync",
        "TORCH_THREADS": 1,
    }
    config.update(extra)
    return config


@pytest.fixture(scope="session")
def app(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return create_app(
        tiny_config(model_dirs, tmp_path_factory.mktemp("cache"), MAX_BODY_BYTES=4096)
    )


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def embedded_app() -> Flask:
    return create_app(
        {"MODELS": "smollm2-135m-instruct", "MODEL_CACHE": str(EMBEDDED_CACHE), "LOAD_MODE": "sync"}
    )


@pytest.fixture
def embedded_client(embedded_app: Flask) -> Iterator[FlaskClient]:
    yield embedded_app.test_client()


def engine_counters(site: str, model: str) -> dict[str, Any]:
    """A served model's engine counters, from ``/info``."""
    return dict(requests.get(f"{site}/info", timeout=30).json()["engines"][model])


def serve(app: Flask) -> Iterator[str]:
    """The app on a real HTTP server on loopback (werkzeug, threaded): its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@contextmanager
def activation_digits(digits: int) -> Iterator[None]:
    """textgen's kernels take ``digits`` activation digits in this process for the block (as
    TEXTGEN_ACTIVATION_BITS sets them for a server), the default two again after it."""
    from textgen.models import blockwise

    blockwise.set_activation_digits(digits)
    try:
        yield
    finally:
        blockwise.set_activation_digits(2)


@contextmanager
def served(config: dict[str, Any]) -> Iterator[str]:
    """An app built from ``config``, served over HTTP for the block, then closed."""
    app = create_app(config)
    try:
        yield from serve(app)
    finally:
        app.extensions["textgen.registry"].close()


def in_threads(jobs: list[Any]) -> list[Any]:
    """Run the callables at once (released together); their results in order."""
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.fixture(scope="session")
def live(app: Flask) -> Iterator[str]:
    """The tiny-model app served over HTTP."""
    yield from serve(app)


# --- gunicorn, for real -------------------------------------------------------------------
def gunicorn(env: dict[str, str], *args: str, log: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """gunicorn with gunicorn.conf.py and wsgi.py; only ``env``'s TEXTGEN_/GUNICORN_ settings.
    Its output goes to ``log`` (a file, for a server that logs more than a pipe holds)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TEXTGEN_", "GUNICORN_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "wsgi:app"],
        cwd=REPO,
        env={**clean, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(
    process: subprocess.Popen[str], url: str, seconds: float = 300, in_a_row: int = 1
) -> None:
    """Until /health answers 200 ``in_a_row`` times running (the process must stay up
    meanwhile). Each worker answers for itself, and one still loading answers 503: with two
    workers, 20 answers in a row all from the ready one are a chance of 2^-19."""
    deadline, ready = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "exited"
        try:
            ok = requests.get(f"{url}/health", timeout=10).status_code == 200
        except requests.RequestException:  # refused before bind, slow while loading
            ok = False
        ready = ready + 1 if ok else 0
        if ready >= in_a_row:
            return
        time.sleep(0.05 if ok else 0.25)
    pytest.fail("gunicorn did not become healthy")


# --- a real browser -------------------------------------------------------------------------
def chromium_path() -> str:
    """Debian's Chromium, which Playwright drives (it cannot download its own browsers)."""
    found = shutil.which("chromium")
    assert found, "Debian's chromium is needed (deploy/system.sh installs it)"
    return found


def local_only(page: Any) -> set[str | None]:
    """Route every request the page sends through a check: one for 127.0.0.1 goes on, any
    other is refused. The hosts seen are collected in the set returned."""
    hosts: set[str | None] = set()

    def watch(route: Any) -> None:
        host = urlsplit(route.request.url).hostname
        hosts.add(host)
        if host == "127.0.0.1":
            route.continue_()
        else:
            route.abort()

    page.route("**/*", watch)
    return hosts
