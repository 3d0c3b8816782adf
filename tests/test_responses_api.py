"""POST /v1/responses through the official openai SDK: plain, streamed, JSON schema, tools."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.test_tools import WEATHER, tools_url  # noqa: F401 (a fixture)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


@pytest.fixture
def client(live: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_plain_response_matches_chat(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="tiny-llama",
        instructions="Be brief.",
        input="Hello there",
        max_output_tokens=6,
        temperature=0,
    )
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None
    assert response.usage.output_tokens == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert response.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


def test_streamed_events_build_the_same_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "tiny-llama",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "max_output_tokens": 8,
        "temperature": 0,
    }
    whole = client.responses.create(**args)
    kinds, text, final = [], "", None
    for event in client.responses.create(**args, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.done" in kinds
    assert text == whole.output_text and final is not None and final.output_text == text


def test_json_schema_format_is_enforced(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.responses.create(
            model="tiny-llama",
            input="Weather as JSON",
            max_output_tokens=60,
            temperature=0.8,
            extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "weather", "schema": SCHEMA}},
        )
        jsonschema.validate(json.loads(response.output_text), SCHEMA)


@pytest.fixture
def tools_client(tools_url: str) -> Iterator[openai.OpenAI]:  # noqa: F811
    with openai.OpenAI(base_url=f"{tools_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_a_required_function_call(tools_client: openai.OpenAI) -> None:
    tool = {"type": "function", **WEATHER.openai()["function"]}
    args: dict[str, Any] = {
        "model": "tiny-llama",
        "input": "Weather in Paris?",
        "tools": [tool],
        "tool_choice": "required",
        "max_output_tokens": 120,
        "temperature": 0,
    }
    whole = tools_client.responses.create(**args).output
    streamed = [
        event.item
        for event in tools_client.responses.create(**args, stream=True)
        if event.type == "response.output_item.done"
    ]
    for items in (whole, streamed):
        call = items[0]
        assert call.type == "function_call" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER.parameters)
    assert whole[0].arguments == streamed[0].arguments


def test_stateless(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="tiny-llama", input="Hi", previous_response_id="resp_1")
    assert bad.value.body["param"] == "previous_response_id"  # type: ignore[index]
