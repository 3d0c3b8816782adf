"""What OpenAI client libraries send and expect: nulls, fields they always pass, their errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from textgen.openai.protocol import ChatCompletionSchema, CompletionSchema

REQUIRED = {
    "/v1/completions": {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    },
    "/generate": {"prompt": "Hello", "max_new_tokens": 2},
    "/tokenize": {"prompt": "Hello"},
    "/detokenize": {"tokens": [1, 2]},
}


@pytest.fixture
def client(live: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def optional_fields(path: str) -> list[str]:
    from textgen.api.schemas import GenerateSchema
    from textgen.api.tokenize import DetokenizeSchema, TokenizeSchema

    schema = {
        "/v1/completions": CompletionSchema,
        "/v1/chat/completions": ChatCompletionSchema,
        "/generate": GenerateSchema,
        "/tokenize": TokenizeSchema,
        "/detokenize": DetokenizeSchema,
    }[path]()
    return [
        field.data_key or name
        for name, field in schema.fields.items()
        if not field.required and (field.data_key or name) not in REQUIRED[path]
    ]


@pytest.mark.parametrize("path", list(REQUIRED))
def test_every_optional_field_may_be_null(live: str, path: str) -> None:
    # LangChain's OpenAI class sends "seed": null, "logprobs": null... on every call.
    nulls = dict.fromkeys(optional_fields(path))
    assert nulls
    body = {**nulls, **REQUIRED[path]}
    # The exclusive pairs (prompt/messages, model/models) are null on one side: not given.
    response = requests.post(f"{live}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.json()


def test_null_still_counts_as_missing_for_required_fields(live: str) -> None:
    response = requests.post(
        f"{live}/v1/completions", json={"model": "tiny-llama", "prompt": None}, timeout=30
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_harmless_openai_fields_are_accepted(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    completion = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=2,
        store=False,
        metadata={"team": "a"},
        service_tier="auto",
        reasoning_effort="low",
        modalities=["text"],
        prediction={"type": "content", "content": "Hello"},
        user="someone",
    )
    assert completion.choices[0].message.role == "assistant"
    # A field that would change the output, and is not supported, stays a clear 400.
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=2, modalities=["text", "audio"]
        )
    assert bad.value.body["param"].startswith("modalities")  # type: ignore[index]


def test_any_signed_64_bit_seed(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(
            model="tiny-llama", prompt="Hello", max_tokens=6, temperature=0.9, seed=seed
        )
        return out.choices[0].text

    assert sample(-1) == sample(-1)
    assert sample(-(2**63)) == sample(-(2**63))
    with pytest.raises(openai.BadRequestError):
        sample(2**63)


def test_context_overflow_reads_as_openai_writes_it(client: openai.OpenAI) -> None:
    # tiny-llama has 256 positions, tiny-gpt2 64: LiteLLM and LangChain look for this code
    # and wording.
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Hello world " * 150}],
            max_tokens=4,
        )
    body: Any = bad.value.body
    assert body["code"] == "context_length_exceeded"
    assert body["type"] == "invalid_request_error"
    assert body["message"].startswith("This model's maximum context length is ")
    assert "However, your messages resulted in" in body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=100)
    body = bad.value.body
    assert body["code"] == "context_length_exceeded"
    assert "in the prompt, 100 in the completion" in body["message"]
