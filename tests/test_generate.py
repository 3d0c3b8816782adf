"""POST /generate on the tiny models, checked against transformers directly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient


def runner(app: Flask, name: str) -> Any:
    return app.extensions["textgen.registry"].engine(name).runner


def reference_greedy(app: Flask, name: str, prompt: str, new_tokens: int) -> str:
    """What model.generate gives directly, for the same prompt and length."""
    loaded = runner(app, name).loaded
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=loaded.pad_token_id,
        )
    return loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def generate(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def texts(body: dict[str, Any], result: int = 0) -> list[str]:
    return [o["text"] for o in body["results"][result]["outputs"]]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_greedy_matches_model_generate(app: Flask, client: FlaskClient, model: str) -> None:
    body = generate(client, prompt="Once upon a time", model=model, max_new_tokens=12)
    output = body["results"][0]["outputs"][0]
    # Random tiny models rarely emit EOS; when they do, the reference must be cut there too.
    if output["finish_reason"] == "length":
        assert output["text"] == reference_greedy(app, model, "Once upon a time", 12)
        assert output["completion_tokens"] == 12
    assert body["results"][0]["parameters"]["strategy"] == "greedy"


def test_response_shape_usage_and_timings(client: FlaskClient) -> None:
    body = generate(client, prompt="Hello world", max_new_tokens=5)
    result = body["results"][0]
    assert result["model"] == "tiny-llama"  # the first configured model is the default
    assert result["usage"]["completion_tokens"] == sum(
        o["completion_tokens"] for o in result["outputs"]
    )
    assert result["usage"]["total_tokens"] == (
        result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    )
    assert body["usage"] == result["usage"]
    timings = result["timings"]
    assert 0 <= timings["queue_s"] <= timings["time_to_first_token_s"]
    assert timings["time_to_first_token_s"] <= timings["queue_s"] + timings["generation_s"]
    assert timings["tokens_per_second"] > 0
    assert body["id"].startswith("gen-")


def test_same_seed_same_output_and_seeds_differ(client: FlaskClient) -> None:
    request = {"prompt": "The capital", "strategy": "sampling", "temperature": 1.5, "top_p": 1.0}
    first = generate(client, seed=1234, max_new_tokens=16, **request)
    again = generate(client, seed=1234, max_new_tokens=16, **request)
    other = generate(client, seed=4321, max_new_tokens=16, **request)
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)
    assert first["results"][0]["parameters"]["seed"] == 1234


def test_sampling_without_seed_reports_the_seed_it_used(client: FlaskClient) -> None:
    body = generate(client, prompt="Hi", strategy="top_k", max_new_tokens=8)
    seed = body["results"][0]["parameters"]["seed"]
    replay = generate(client, prompt="Hi", strategy="top_k", max_new_tokens=8, seed=seed)
    assert texts(replay) == texts(body)


def test_several_models_return_one_result_each(client: FlaskClient) -> None:
    body = generate(client, prompt="Hello", models=["tiny-llama", "tiny-gpt2"], max_new_tokens=6)
    assert [r["model"] for r in body["results"]] == ["tiny-llama", "tiny-gpt2"]
    assert body["usage"]["completion_tokens"] == sum(
        r["usage"]["completion_tokens"] for r in body["results"]
    )


def test_batch_of_prompts_matches_single_prompts(client: FlaskClient) -> None:
    prompts = ["Hello world", "The capital of France is"]
    batch = generate(client, prompt=prompts, max_new_tokens=6)
    outputs = batch["results"][0]["outputs"]
    assert [o["prompt_index"] for o in outputs] == [0, 1]
    for index, prompt in enumerate(prompts):
        single = generate(client, prompt=prompt, max_new_tokens=6)
        assert outputs[index]["text"] == texts(single)[0]


def test_beam_returns_distinct_sequences(client: FlaskClient) -> None:
    body = generate(
        client,
        prompt="Once",
        strategy="beam",
        num_beams=4,
        num_return_sequences=3,
        max_new_tokens=6,
    )
    outputs = body["results"][0]["outputs"]
    assert [o["index"] for o in outputs] == [0, 1, 2]
    assert len({o["text"] for o in outputs}) == 3


def test_num_return_sequences_with_sampling(client: FlaskClient) -> None:
    body = generate(
        client,
        prompt=["a", "b"],
        strategy="sampling",
        num_return_sequences=2,
        seed=3,
        max_new_tokens=4,
    )
    pairs = [(o["prompt_index"], o["index"]) for o in body["results"][0]["outputs"]]
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_stop_string_spanning_a_token_boundary(app: Flask, client: FlaskClient) -> None:
    prompt = "Once upon"
    text = reference_greedy(app, "tiny-llama", prompt, 20)
    tokenizer = runner(app, "tiny-llama").loaded.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    # A stop made of the last character of one token and the first of the next.
    boundary = next(
        i
        for i in range(2, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[boundary][-1] + pieces[boundary + 1][0]
    body = generate(client, prompt=prompt, max_new_tokens=20, stop=["never-there", stop])
    output = body["results"][0]["outputs"][0]
    assert output["finish_reason"] == "stop"
    assert stop not in output["text"]
    assert output["text"] == text[: text.index(stop)]
    assert output["completion_tokens"] < 20


def test_max_length_counts_the_prompt(app: Flask, client: FlaskClient) -> None:
    prompt_tokens = len(runner(app, "tiny-llama").loaded.tokenizer("Hello world")["input_ids"])
    body = generate(client, prompt="Hello world", max_length=prompt_tokens + 4)
    assert body["results"][0]["parameters"]["max_new_tokens"] == 4
    response = client.post("/generate", json={"prompt": "Hello world", "max_length": prompt_tokens})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "max_length"


def test_chat_uses_the_chat_template(app: Flask, client: FlaskClient) -> None:
    tokenizer = runner(app, "tiny-llama").loaded.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    body = generate(client, messages=messages, max_new_tokens=3)
    assert body["results"][0]["usage"]["prompt_tokens"] == len(expected)
    plain = generate(client, prompt="Hi", chat=True, max_new_tokens=3)
    single = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(single, list):
        single = single["input_ids"]
    assert plain["results"][0]["usage"]["prompt_tokens"] == len(single)


def test_chat_on_model_without_template_is_400(client: FlaskClient) -> None:
    response = client.post("/generate", json={"prompt": "Hi", "chat": True, "model": "tiny-gpt2"})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "chat_template_missing"


def test_prompt_over_the_context_is_400(client: FlaskClient) -> None:
    # tiny-gpt2 has 64 positions.
    response = client.post(
        "/generate", json={"prompt": "Hello world " * 40, "model": "tiny-gpt2", "max_new_tokens": 4}
    )
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "64" in error["message"]


def test_prompt_plus_new_tokens_over_the_context_is_400(client: FlaskClient) -> None:
    response = client.post(
        "/generate", json={"prompt": "Hello", "model": "tiny-gpt2", "max_new_tokens": 100}
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "max_new_tokens"


def test_a_failing_model_in_a_multi_model_request_generates_nothing(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.scheduler import Engine

    calls: list[str] = []
    real_submit = Engine.submit

    def counting_submit(self: Engine, *args: Any) -> Any:
        calls.append(self.name)
        return real_submit(self, *args)

    monkeypatch.setattr(Engine, "submit", counting_submit)
    # tiny-gpt2 has no chat template, so the request fails, and tiny-llama must not run first.
    response = client.post(
        "/generate", json={"prompt": "Hi", "chat": True, "models": ["tiny-llama", "tiny-gpt2"]}
    )
    assert response.status_code == 400
    assert calls == []
    assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200
    assert calls == ["tiny-llama"]


def test_ignore_eos_generates_the_full_budget(app: Flask, client: FlaskClient) -> None:
    loaded = runner(app, "tiny-llama").loaded
    # Make EOS the certain next token, then ask to ignore it.
    bias = torch.zeros(loaded.model.config.vocab_size)
    bias[loaded.eos_token_ids[0]] = 1e4
    head = loaded.model.lm_head
    original = head.bias
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        ended = generate(client, prompt="Hi", max_new_tokens=6)["results"][0]["outputs"][0]
        full = generate(client, prompt="Hi", max_new_tokens=6, ignore_eos=True)
    finally:
        head.bias = original
    assert ended["finish_reason"] == "eos" and ended["completion_tokens"] == 1
    output = full["results"][0]["outputs"][0]
    assert output["finish_reason"] == "length" and output["completion_tokens"] == 6
    assert full["results"][0]["parameters"]["ignore_eos"] is True
