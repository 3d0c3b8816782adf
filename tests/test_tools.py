"""Function calling: the prompt offers the tools, a grammar keeps calls to the schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import served
from tests.tiny_models import save_tiny_llama
from textgen.generation.prompts import PromptInput, render_prompt
from textgen.generation.tools import Tool, call_schema, generic_turns, parse_call, starts_call

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
TIME = Tool("get_time", "The time now", {"type": "object", "properties": {}})
TOOLS = [tool.openai() for tool in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- pure ---------------------------------------------------------------------------------
def test_a_call_parses_from_plain_tagged_or_fenced_json() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    for text in (call, f"<tool_call>\n{call}\n</tool_call>", f"```json\n{call}\n```"):
        parsed = parse_call(text, (WEATHER, TIME))
        assert parsed is not None and parsed.arguments["city"] == "Paris"
        assert starts_call(text)
    assert parse_call('{"name": "nope", "arguments": {}}', (WEATHER,)) is None
    assert parse_call("It is sunny.", (WEATHER,)) is None and not starts_call("It is sunny.")


def test_the_call_schema_accepts_calls_to_the_tools_only() -> None:
    schema = call_schema((WEATHER, TIME))
    jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    jsonschema.validate(
        {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}, schema
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    named = call_schema((WEATHER, TIME), "get_time")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, named)


def test_the_generic_prompt_writes_tools_calls_and_results() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    turns = generic_turns(history, (WEATHER,))
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert "get_weather" in turns[0]["content"] and turns[0]["content"].startswith("Be brief.")
    assert json.loads(turns[2]["content"]) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert turns[3]["content"] == "Result of call_1: 18 C"


class ToolTemplate:
    """A tokenizer whose template renders tools itself (as Qwen2's does): what it was given."""

    chat_template = "{% for tool in tools %}...{% endfor %}"

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str:
        self.seen = (conversation, kwargs)
        return "rendered"


def test_a_template_that_knows_tools_gets_them() -> None:
    templater = ToolTemplate()
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = ({"role": "assistant", "content": None, "tool_calls": [call]},)
    render_prompt(templater, PromptInput(messages=messages, tools=(TIME,)), "m")
    conversation, kwargs = templater.seen
    assert kwargs["tools"] == [TIME.openai()]
    assert conversation[0]["tool_calls"][0]["function"]["arguments"] == {}


# --- through HTTP, on the tiny model --------------------------------------------------------
@pytest.fixture(scope="module")
def tools_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The generic tool prompt is long in a tiny tokenizer's tokens: a context of 2048.
    root = tmp_path_factory.mktemp("tools")
    model = save_tiny_llama(root / "tiny-llama", max_positions=2048)
    config = {
        "MODELS": [{"name": "tiny-llama", "source": str(model)}],
        "MODEL_CACHE": str(root / "cache"),
        "LOAD_MODE": "sync",
        "TORCH_THREADS": 1,
    }
    with served(config) as url:
        yield url


@pytest.fixture
def client(tools_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tools_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def assert_valid_call(message: Any, name: str | None = None) -> dict[str, Any]:
    assert message.content is None and message.tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    tool = {t.name: t for t in (WEATHER, TIME)}[call.function.name]
    assert name is None or call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool.parameters)
    return arguments


def test_required_and_named_calls_validate_against_the_schema(client: openai.OpenAI) -> None:
    # A random tiny model: only the grammar makes these calls valid.
    for seed in range(20):
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            out = client.chat.completions.create(
                model="tiny-llama",
                messages=ASK,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=choice,  # type: ignore[arg-type]
                temperature=0.7,
                seed=seed,
                max_tokens=120,
            )
            assert out.choices[0].finish_reason == "tool_calls"
            named = None if choice == "required" else "get_weather"
            assert_valid_call(out.choices[0].message, named)


def test_streamed_call_deltas_reassemble_into_the_call(client: openai.OpenAI) -> None:
    def ask(stream: bool) -> Any:
        return client.chat.completions.create(
            model="tiny-llama",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            temperature=0,
            max_tokens=120,
            stream=stream,
        )

    whole = ask(False).choices[0].message.tool_calls[0]
    name, arguments, reasons = "", "", []
    for chunk in ask(True):
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert (name, json.loads(arguments)) == (
        whole.function.name,
        json.loads(whole.function.arguments),
    )
    assert reasons[-1] == "tool_calls"


def test_a_conversation_with_tool_results(client: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'},
    }
    out = client.chat.completions.create(
        model="tiny-llama",
        messages=[  # type: ignore[list-item]
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        max_tokens=5,
    )
    assert out.choices[0].message.content is not None
    assert out.choices[0].finish_reason in ("stop", "length")


def test_auto_answers_text_or_a_valid_call(client: openai.OpenAI) -> None:
    for seed in range(6):
        out = client.chat.completions.create(
            model="tiny-llama",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
        message = out.choices[0].message
        if out.choices[0].finish_reason == "tool_calls":
            assert_valid_call(message)
        else:
            assert message.content is not None and message.tool_calls is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ],
)
def test_bad_tool_requests(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="tiny-llama",
            messages=ASK,  # type: ignore[arg-type]
            max_tokens=4,
            **extra,
        )
    assert bad.value.body["param"].startswith(param), bad.value.body  # type: ignore[index]
