"""Beam search decoded step by step in the running batch, checked against generate()."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from transformers import GenerationConfig

from textgen.generation.strategies import resolve_params


def reference(app: Flask, model: str, prompts: list[str], **fields: Any) -> list[list[str]]:
    """What transformers' own beam search gives for the same prompts and settings."""
    loaded = app.extensions["textgen.registry"].engine(model).runner.loaded
    params = resolve_params({"strategy": "beam", **fields})
    config = GenerationConfig(
        **params.generation_kwargs(),
        max_new_tokens=params.max_new_tokens,
        eos_token_id=None if params.ignore_eos else list(loaded.eos_token_ids),
        pad_token_id=loaded.pad_token_id,
    )
    out = []
    for prompt in prompts:
        ids = torch.tensor([loaded.tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            rows = loaded.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        texts = []
        for row in rows[:, ids.shape[1] :].tolist():
            eos = set() if params.ignore_eos else set(loaded.eos_token_ids)
            cut = next((i for i, token in enumerate(row) if token in eos), len(row))
            texts.append(loaded.tokenizer.decode(row[:cut], skip_special_tokens=True))
        out.append(texts)
    return out


def served(client: FlaskClient, model: str, prompts: list[str], **fields: Any) -> list[list[str]]:
    body = {"model": model, "prompt": prompts, "strategy": "beam", **fields}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.get_json()
    outputs = response.get_json()["results"][0]["outputs"]
    texts: list[list[str]] = [[] for _ in prompts]
    for output in outputs:
        texts[output["prompt_index"]].append(output["text"])
    return texts


@pytest.mark.parametrize(
    "model,fields",
    [
        ("tiny-llama", {"num_beams": 4, "num_return_sequences": 3, "max_new_tokens": 12}),
        ("tiny-llama", {"num_beams": 2, "max_new_tokens": 20, "repetition_penalty": 1.3}),
        ("tiny-llama", {"num_beams": 3, "max_new_tokens": 16, "no_repeat_ngram_size": 2}),
        ("tiny-llama", {"num_beams": 4, "max_new_tokens": 10, "ignore_eos": True}),
        ("tiny-gpt2", {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 15}),
    ],
)
def test_beams_equal_transformers_beam_search(
    app: Flask, client: FlaskClient, model: str, fields: dict[str, Any]
) -> None:
    prompts = ["Once upon a time", "The capital of France is", "Hello"]
    assert served(client, model, prompts, **fields) == reference(app, model, prompts, **fields)


def test_beam_stop_strings_end_outputs(client: FlaskClient) -> None:
    body = {"prompt": "Once upon a time", "strategy": "beam", "num_beams": 3}
    plain = client.post("/generate", json={**body, "max_new_tokens": 16}).get_json()
    text = plain["results"][0]["outputs"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.post("/generate", json={**body, "max_new_tokens": 16, "stop": stop})
    output = stopped.get_json()["results"][0]["outputs"][0]
    assert stop not in output["text"] and output["finish_reason"] == "stop"


def test_a_greedy_request_is_not_held_behind_a_beam_search(app: Flask) -> None:
    """Beams are rows of the batch: a short greedy request starts and ends while a long beam
    search is still running (it used to wait for the search to finish)."""
    client = app.test_client()
    beam = {
        "prompt": "Once upon a time",
        "strategy": "beam",
        "num_beams": 4,
        "max_new_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    started = threading.Event()

    def run_beam() -> None:
        response = client.post("/generate", json=beam)
        for chunk in response.response:  # type: ignore[attr-defined]
            started.set()
            events.append(chunk.decode() if isinstance(chunk, bytes) else chunk)

    thread = threading.Thread(target=run_beam)
    thread.start()
    engine = app.extensions["textgen.registry"].engine(None)
    for _ in range(2000):  # until the search's four beams are decoding
        if engine.metrics.snapshot()["running"] >= 4:
            break
        threading.Event().wait(0.005)
    greedy = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 3})
    assert greedy.status_code == 200
    beam_done_before = any("[DONE]" in e for e in events)
    thread.join(timeout=120)
    assert not beam_done_before
    summary = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert summary[-1]["results"][0]["parameters"]["num_beams"] == 4
