"""The OpenAI-compatible API, driven by the official openai client over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from flask import Flask

from tests.conftest import serve
from textgen import create_app


@pytest.fixture(scope="module")
def base_url(live: str) -> Iterator[str]:
    yield f"{live}/v1"


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    # No retries: a 429 must reach the test, not be retried away.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def loaded(app: Flask, name: str = "tiny-llama") -> Any:
    return app.extensions["textgen.registry"].engine(name).runner.loaded


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["tiny-llama", "tiny-gpt2"]
    assert client.models.retrieve("tiny-gpt2").id == "tiny-gpt2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_completion_matches_generate(app: Flask, client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="tiny-llama", prompt="Once upon a time", max_tokens=10, temperature=0
    )
    native = app.test_client().post(
        "/generate", json={"prompt": "Once upon a time", "max_new_tokens": 10}
    )
    expected = native.get_json()["results"][0]["outputs"][0]
    choice = completion.choices[0]
    assert choice.text == expected["text"]
    assert completion.object == "text_completion"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == expected["completion_tokens"]
    assert choice.finish_reason in ("length", "stop")


def test_a_vanishing_temperature_samples_greedily(client: openai.OpenAI) -> None:
    """A temperature just above 0 overflows the scores; its limit, greedy, is what it gets
    (schemathesis found the 500 it gave)."""
    greedy = client.completions.create(
        model="tiny-llama", prompt="Once upon a time", max_tokens=8, temperature=0
    )
    for temperature in (1e-284, 1e-30):
        tiny = client.completions.create(
            model="tiny-llama", prompt="Once upon a time", max_tokens=8, temperature=temperature
        )
        assert tiny.choices[0].text == greedy.choices[0].text


def test_completion_stream_equals_whole(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "tiny-llama",
        "prompt": ["Hello", "The capital"],
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = client.completions.create(**request)
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_and_seed(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "tiny-llama",
        "prompt": "Once",
        "max_tokens": 12,
        "temperature": 1.0,
        "n": 2,
        "seed": 5,
    }
    first = client.completions.create(**request)
    again = client.completions.create(**request)
    other = client.completions.create(**{**request, "seed": 6})
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.text for c in first.choices] != [c.text for c in other.choices]


def test_stop_strings(client: openai.OpenAI) -> None:
    free = (
        client.completions.create(
            model="tiny-llama", prompt="Once upon", max_tokens=20, temperature=0
        )
        .choices[0]
        .text
    )
    stop = free[4:7]
    stopped = client.completions.create(
        model="tiny-llama", prompt="Once upon", max_tokens=20, temperature=0, stop=[stop]
    ).choices[0]
    assert stopped.text == free[: free.index(stop)]
    assert stopped.finish_reason == "stop"


def test_logprobs_are_the_models_own(app: Flask, client: openai.OpenAI) -> None:
    prompt = "The capital of"
    completion = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs and logprobs.top_logprobs
    model = loaded(app)
    ids = model.tokenizer(prompt)["input_ids"]
    for step, logprob in enumerate(logprobs.token_logprobs):
        with torch.inference_mode():
            logits = model.model(torch.tensor([ids])).logits[0, -1]
        direct = torch.log_softmax(logits.float(), dim=-1)
        chosen = int(direct.argmax())
        assert logprob == pytest.approx(float(direct[chosen]), abs=1e-4)
        top = logprobs.top_logprobs[step]
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy took the argmax
        assert len(top) == 3  # fragments of characters keep distinct "bytes:" keys
        ids.append(chosen)


def test_echo_with_logprobs_covers_the_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="tiny-llama",
        prompt="Hello world",
        max_tokens=3,
        temperature=0,
        logprobs=0,
        echo=True,
    )
    choice = completion.choices[0]
    assert choice.text.startswith("Hello world")
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])
    prompt_tokens = completion.usage.prompt_tokens  # type: ignore[union-attr]
    assert "".join((choice.logprobs.tokens or [])[:prompt_tokens]) == "Hello world"


def test_token_id_prompts(app: Flask, client: openai.OpenAI) -> None:
    ids = loaded(app).tokenizer("Once upon a time")["input_ids"]
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(
        model="tiny-llama", prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_completion_whole_and_streamed(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    # Once before, so both requests below continue the same prompt from the prefix cache
    # and report the same cached tokens (whichever test ran before).
    client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, temperature=0
    )
    whole = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage == whole.usage


def test_chat_seed_and_logprobs(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell a story"}],
        "max_tokens": 8,
        "seed": 42,
        "logprobs": True,
        "top_logprobs": 2,
    }
    first = client.chat.completions.create(**request)
    again = client.chat.completions.create(**request)
    assert first.choices[0].message.content == again.choices[0].message.content
    content = first.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(entry.top_logprobs) == 2 for entry in content)


def test_chat_prompt_is_the_chat_template(app: Flask, base_url: str) -> None:
    import requests

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    expected = loaded(app).tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    root = base_url.removesuffix("/v1")
    tokens = requests.post(f"{root}/tokenize", json={"messages": messages}, timeout=30).json()
    assert tokens["tokens"] == expected and tokens["count"] == len(expected)
    text = requests.post(f"{root}/detokenize", json={"tokens": expected}, timeout=30).json()
    assert "<|im_start|>assistant" in text["prompt"]
    assert len(text["pieces"]) == len(expected)


def test_logit_bias_and_penalties(app: Flask, client: openai.OpenAI) -> None:
    tokenizer = loaded(app).tokenizer
    forced = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    biased = client.completions.create(
        model="tiny-llama", prompt="Hi", max_tokens=4, temperature=0, logit_bias={str(forced): 100}
    )
    assert biased.choices[0].text == tokenizer.decode([forced]) * 4
    plain = (
        client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    penalised = (
        client.completions.create(
            model="tiny-gpt2", prompt="Hello", max_tokens=12, temperature=0, frequency_penalty=2.0
        )
        .choices[0]
        .text
    )
    assert penalised != plain


def test_min_tokens_holds_off_eos(app: Flask, client: openai.OpenAI) -> None:
    eos = loaded(app).eos_token_ids[0]
    ended = client.completions.create(
        model="tiny-llama", prompt="Hi", max_tokens=10, temperature=0, logit_bias={str(eos): 100}
    )
    assert ended.usage is not None and ended.usage.completion_tokens == 1
    held = client.completions.create(
        model="tiny-llama",
        prompt="Hi",
        max_tokens=10,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 4},
    )
    assert held.usage is not None and held.usage.completion_tokens == 5


def test_bad_requests_raise_the_right_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-llama", prompt="Hi", temperature=3.0)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="Hi")
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny-gpt2", prompt="Hello world " * 40, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="Hi", suffix="!")


@pytest.mark.slow
def test_full_queue_is_a_rate_limit_error() -> None:
    import requests

    from tests.conftest import EMBEDDED_CACHE

    app = create_app(
        {
            "MODELS": "smollm2-135m-instruct",
            "MODEL_CACHE": str(EMBEDDED_CACHE),
            "LOAD_MODE": "sync",
            "MAX_QUEUE": 1,
        }
    )
    for root in serve(app):
        base_url = f"{root}/v1"
        # A long streaming request holds the only slot while we ask again. The line iterator
        # stays referenced: when urllib3's reading generator is closed (a discarded iterator is
        # collected at once) it closes the connection, and the server then cancels the request.
        with requests.post(
            f"{root}/generate",
            json={"prompt": "Once", "max_new_tokens": 200, "stream": True},
            stream=True,
            timeout=60,
        ) as held:
            lines = held.iter_lines()
            next(lines)
            client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as limited:
                client.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2)
            assert int(limited.value.response.headers["Retry-After"]) >= 1


def test_streamed_echo_starts_with_the_prompt(app: Flask, client: openai.OpenAI) -> None:
    ids = loaded(app).tokenizer("Hello world")["input_ids"]
    for prompt in ("Hello world", ids):
        chunks = list(
            client.completions.create(
                model="tiny-llama",
                prompt=prompt,
                max_tokens=3,
                temperature=0,
                echo=True,
                stream=True,
            )
        )
        whole = client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=3, temperature=0, echo=True
        )
        assert chunks[0].choices[0].text == "Hello world"
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def embedded_url(embedded_app: Flask) -> Iterator[str]:
    for root in serve(embedded_app):
        yield f"{root}/v1"


@pytest.mark.slow
def test_json_mode_outputs_always_parse(embedded_url: str) -> None:
    import json

    client = openai.OpenAI(base_url=embedded_url, api_key="unused", max_retries=0)
    texts = []
    for seed in (1, 2):  # 20 sampled outputs, in two batches of 10
        completion = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Describe a cat as JSON with a name and age."}],
            n=10,
            seed=seed,
            temperature=0.7,
            # Small on purpose: some outputs would run past it (one loops on keys forever);
            # the grammar closes them before the budget ends.
            max_tokens=64,
            response_format={"type": "json_object"},
        )
        assert {c.finish_reason for c in completion.choices} == {"stop"}
        texts += [c.message.content or "" for c in completion.choices]
    assert len(texts) == 20
    assert all(isinstance(json.loads(text), dict) for text in texts)


@pytest.mark.slow
def test_json_schema_outputs_validate(embedded_url: str) -> None:
    import json

    import jsonschema

    client = openai.OpenAI(base_url=embedded_url, api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Describe a cat."}],
        n=4,
        seed=3,
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}},
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_bad_response_formats(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "x"}]
    for fmt in (
        {"type": "yaml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
        # Unknown keys inside are refused, not ignored: a client must not believe a schema
        # is enforced when it is not.
        {"type": "json_object", "schema": 123},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strictly": True}},
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="tiny-llama", messages=messages, max_tokens=4, response_format=fmt
            )  # type: ignore[arg-type]
        assert bad.value.body["param"].startswith("response_format"), fmt  # type: ignore[index]


def test_json_closes_within_a_small_budget(client: openai.OpenAI) -> None:
    """A random model never closes JSON by itself; near the end of the budget it must."""
    import json

    for max_tokens in (3, 12, 30):
        completion = client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "x"}],
            n=5,
            seed=1,
            temperature=1.0,
            max_tokens=max_tokens,
            response_format={"type": "json_object"},
        )
        for choice in completion.choices:
            assert isinstance(json.loads(choice.message.content or ""), dict)
            assert choice.finish_reason == "stop"
