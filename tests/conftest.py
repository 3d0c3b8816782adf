"""Shared fixtures: tiny models built once per session, apps and clients over them."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from tests.tiny_models import save_tiny_gpt2, save_tiny_llama
from textgen import create_app

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


def serve(app: Flask) -> Iterator[str]:
    """The app on a real HTTP server on loopback (werkzeug, threaded): its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def live(app: Flask) -> Iterator[str]:
    """The tiny-model app served over HTTP."""
    yield from serve(app)
