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


# --- what lm-evaluation-harness's remote tokenizer asks -------------------------------------
def test_tokenizer_info_and_tokenize_without_special_tokens(live: str, app: Any) -> None:
    info = requests.get(f"{live}/tokenizer_info", timeout=30).json()
    tokenizer = app.extensions["textgen.registry"].engine(None).runner.loaded.tokenizer
    assert info["model"] == "tiny-llama"
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template
    assert info["vocab_size"] == len(tokenizer)
    other = requests.get(f"{live}/tokenizer_info", params={"model": "tiny-gpt2"}, timeout=30)
    assert other.json()["model"] == "tiny-gpt2"
    missing = requests.get(f"{live}/tokenizer_info", params={"model": "nope"}, timeout=30)
    assert missing.status_code == 404

    def tokens(**extra: Any) -> list[int]:
        body = {"prompt": "Hello world", **extra}
        return requests.post(f"{live}/tokenize", json=body, timeout=30).json()["tokens"]

    plain = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert tokens(add_special_tokens=False) == plain
    assert tokens() == tokenizer("Hello world")["input_ids"]


def test_pieces_are_readable_text(live: str) -> None:
    text = "Hello wörld ✓"
    body = requests.post(f"{live}/tokenize", json={"prompt": text, "add_special_tokens": False})
    out = body.json()
    assert "".join(out["pieces"]) == text
    assert not any("Ġ" in piece for piece in out["pieces"])
    back = requests.post(f"{live}/detokenize", json={"tokens": out["tokens"]}, timeout=30).json()
    assert back["prompt"] == text and back["pieces"] == out["pieces"]


def test_request_ids_are_echoed_or_made(live: str) -> None:
    given = requests.get(f"{live}/health", headers={"X-Request-ID": "abc-123"}, timeout=30)
    assert given.headers["X-Request-ID"] == "abc-123"
    made = requests.post(f"{live}/generate", json={"prompt": 5}, timeout=30)  # a 400 too
    assert made.status_code == 400 and len(made.headers["X-Request-ID"]) == 32
    forged = requests.get(f"{live}/health", headers={"X-Request-ID": "a\tb" + "x" * 200})
    assert forged.headers["X-Request-ID"] != "a\tb" + "x" * 200
    assert requests.get(f"{live}/nowhere", timeout=30).headers["X-Request-ID"]


def test_system_fingerprint_in_responses_and_chunks(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("fp_")
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            stream=True,
        )
    )
    assert {c.system_fingerprint for c in chunks} == {chunks[0].system_fingerprint}
    other = client.completions.create(model="tiny-gpt2", prompt="Hi", max_tokens=2)
    assert other.system_fingerprint != whole.system_fingerprint


def test_max_tokens_zero_with_echo_scores_the_prompt(client: openai.OpenAI) -> None:
    def score(max_tokens: int) -> Any:
        return client.completions.create(
            model="tiny-llama",
            prompt="The cat sat on the mat",
            max_tokens=max_tokens,
            echo=True,
            logprobs=1,
            temperature=0,
        )

    zero, one = score(0), score(1)
    choice = zero.choices[0]
    assert choice.text == "The cat sat on the mat"
    assert choice.finish_reason == "length"
    assert zero.usage is not None and zero.usage.completion_tokens == 0
    assert choice.logprobs is not None and one.choices[0].logprobs is not None
    prompt_tokens = zero.usage.prompt_tokens
    assert len(choice.logprobs.tokens or []) == prompt_tokens
    # The prompt's logprobs are the same ones a one-token completion reports for it.
    assert (
        choice.logprobs.token_logprobs
        == (one.choices[0].logprobs.token_logprobs or [])[:prompt_tokens]
    )
    assert (choice.logprobs.token_logprobs or [None])[0] is None
    streamed = list(
        client.completions.create(
            model="tiny-llama", prompt="The cat", max_tokens=0, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "The cat"
