"""/health, /models, /strategies and /info."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.conftest import tiny_config
from textgen import create_app
from textgen.service import registry as registry_module


def test_health_ok_when_loaded(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["models"] == ["tiny-llama", "tiny-gpt2"]


def test_models_lists_facts(client: FlaskClient) -> None:
    body = client.get("/models").get_json()
    assert body["default"] == "tiny-llama"
    by_name = {m["name"]: m for m in body["models"]}
    llama, gpt2 = by_name["tiny-llama"], by_name["tiny-gpt2"]
    assert llama["architecture"] == "LlamaForCausalLM"
    assert llama["context_length"] == 256 and gpt2["context_length"] == 64
    assert llama["chat_template"] is True and gpt2["chat_template"] is False
    assert llama["dtype"] == "float32"
    assert llama["kind"] == "local_dir"
    assert 0 < llama["parameters"] < 1_000_000


def test_strategies_describe_parameters(client: FlaskClient) -> None:
    strategies = {s["name"]: s for s in client.get("/strategies").get_json()["strategies"]}
    assert set(strategies) == {"greedy", "beam", "sampling", "top_k"}
    sampling = strategies["sampling"]["parameters"]
    assert sampling["temperature"]["default"] == 0.8
    assert sampling["top_p"]["max"] == 1.0
    assert strategies["greedy"]["parameters"]["max_new_tokens"]["max"] == 1024
    assert strategies["beam"]["settings"]["do_sample"] is False


def test_info_shows_settings_and_threads(client: FlaskClient) -> None:
    body = client.get("/info").get_json()
    # Thread counts are process-wide; the gunicorn test checks them in a real worker.
    assert body["settings"]["torch_threads"] == 1
    assert body["torch"]["interop_threads"] == 1
    assert body["settings"]["max_new_tokens"] == 1024
    assert [m["name"] for m in body["settings"]["models"]] == ["tiny-llama", "tiny-gpt2"]
    assert set(body["engines"]) == {"tiny-llama", "tiny-gpt2"}
    assert body["engines"]["tiny-llama"]["requests"] >= 1  # the warm-up went through the engine


def test_health_is_503_while_loading_then_200(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_load = registry_module.load_model

    def slow_load(*args, **kwargs):
        gate.wait(timeout=30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(registry_module, "load_model", slow_load)
    app = create_app(tiny_config(model_dirs, tmp_path, LOAD_MODE="background"))
    client = app.test_client()
    loading = client.get("/health")
    assert loading.status_code == 503
    assert loading.headers["Retry-After"]
    assert "loading model 'tiny-llama'" in loading.get_json()["detail"]
    # Alive but not ready: a probe keeps the process and sends it no traffic yet.
    assert client.get("/livez").status_code == 200
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert "loading model 'tiny-llama'" in not_ready.get_json()["detail"]
    busy = client.post("/generate", json={"prompt": "Hi"})
    assert busy.status_code == 503
    assert busy.get_json()["error"]["code"] == "model_loading"
    assert client.get("/models").get_json()["models"][0]["status"] == "loading"
    gate.set()
    registry = app.extensions["textgen.registry"]
    for _ in range(300):
        if registry.status()["status"] == "ready":
            break
        threading.Event().wait(0.1)
    assert client.get("/health").status_code == 200
    assert client.get("/readyz").get_json()["status"] == "ok"
    assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


def test_health_reports_a_failed_load(tmp_path: Path) -> None:
    app = create_app(
        {
            "MODELS": str(tmp_path / "missing"),
            "MODEL_CACHE": str(tmp_path),
            "LOAD_MODE": "background",
        }
    )
    registry = app.extensions["textgen.registry"]
    for _ in range(100):
        if registry.status()["status"] == "failed":
            break
        threading.Event().wait(0.05)
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json()["status"] == "failed"
    assert "no config.json" in response.get_json()["detail"]
