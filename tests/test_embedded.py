"""The embedded SmolLM2-135M-Instruct: GGUF conversion into the cache, and real answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import EMBEDDED_CACHE
from tests.test_decoders import assert_near_best, step_by_step
from textgen import create_app
from textgen.models import sources
from textgen.models.cache import ModelCache
from textgen.models.sources import embedded_gguf, prepare
from textgen.models.specs import make_spec, parse_entry

pytestmark = pytest.mark.slow


def test_capital_of_france_names_paris(embedded_client: FlaskClient) -> None:
    response = embedded_client.post(
        "/generate",
        json={"prompt": "What is the capital of France?", "chat": True, "strategy": "greedy"},
    )
    assert response.status_code == 200
    output = response.get_json()["results"][0]["outputs"][0]
    assert "Paris" in output["text"]
    assert output["finish_reason"] == "eos"


@pytest.fixture(scope="module")
def unshared_app() -> Iterator[Flask]:
    """The embedded model with no prefix cache: a prompt computed from scratch every time.
    (Keys and values kept from another request's prefill round differently in their last
    bits, which can flip a near tie in int4; the README says so.)"""
    app = create_app(
        {"MODELS": "smollm2-135m-instruct", "MODEL_CACHE": str(EMBEDDED_CACHE),
         "LOAD_MODE": "sync", "PREFIX_CACHE_TOKENS": 0}
    )  # fmt: skip
    yield app
    app.extensions["textgen.registry"].close()


def test_greedy_follows_transformers_forward(unshared_app: Flask) -> None:
    """The served greedy text is the compiled program's, and each of its tokens is the one
    transformers' forward (eager kernels, the same int4 weights) ranks best or within the
    compiled decoder's bound of it: the two implementations round differently, so near ties
    may go either way (on AVX-512 one did, at the fifth token of this prompt)."""
    loaded = unshared_app.extensions["textgen.registry"].engine(None).runner.loaded
    messages = [{"role": "user", "content": "Name three colours."}]
    text = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    chosen = step_by_step(loaded, ids, 24)
    assert_near_best(loaded.model, ids, chosen)
    body = {"messages": messages, "max_new_tokens": 24, "ignore_eos": True}
    response = unshared_app.test_client().post("/generate", json=body)
    expected = loaded.tokenizer.decode(chosen, skip_special_tokens=True)
    assert response.get_json()["results"][0]["outputs"][0]["text"] == expected


def test_conversion_is_reused(
    embedded_app: Flask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(sources, "write_converted", no_conversion)
    cache = ModelCache(EMBEDDED_CACHE)
    embedded = prepare(make_spec("smollm2-135m-instruct"), cache)
    assert (embedded.path / "model.safetensors").is_file()
    # The same GGUF named by path maps onto the same converted copy.
    gguf = embedded_gguf(make_spec("smollm2-135m-instruct"))
    by_path = prepare(parse_entry(f"copy={gguf}"), cache)
    assert by_path.path == embedded.path
    assert any(e["kind"] == "converted" for e in cache.entries())
