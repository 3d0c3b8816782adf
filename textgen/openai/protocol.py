"""OpenAI request schemas, and the one mapping of their fields onto generation settings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import (
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from textgen.api.fields import RANGES, RequestSchema, StrictBoolean, StrictFloat, StrictInteger
from textgen.api.schemas import (
    SHARED_KNOBS,
    MessageSchema,
    SharedSchema,
    chat_turns,
    resolve,
    server_caps,
)
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import GenerationParams
from textgen.generation.tools import Tool, call_schema
from textgen.openai.fields import MessageContentField, PromptField
from textgen.openai.tool_schemas import ToolCallSchema, ToolChoiceField, ToolSchema, tool_mode


class StreamOptionsSchema(RequestSchema):
    include_usage = StrictBoolean()


class ChatMessageSchema(MessageSchema):
    """One OpenAI chat message: the native one, plus the developer role, content parts and a
    name."""

    role = fields.String(
        required=True,
        validate=validate.OneOf(["system", "developer", "user", "assistant", "tool"]),
    )
    content = MessageContentField(metadata={"description": "null for an assistant's calls"})
    name = fields.String()
    tool_calls = fields.List(fields.Nested(ToolCallSchema), validate=validate.Length(min=1))
    tool_call_id = fields.String(validate=validate.Length(min=1, max=128))

    @validates_schema
    def check_turn(self, data: dict[str, Any], **_: Any) -> None:
        role = data["role"]
        if "content" not in data and not (role == "assistant" and data.get("tool_calls")):
            raise ValidationError("Missing data for required field.", "content")
        if "tool_calls" in data and role != "assistant":
            raise ValidationError("only assistant messages make tool calls", "tool_calls")
        if (role == "tool") != ("tool_call_id" in data):
            raise ValidationError("tool messages, and only they, need tool_call_id", "tool_call_id")


IGNORED = {"description": "accepted for compatibility; changes nothing here"}


class JsonSchemaSpecSchema(RequestSchema):
    """response_format.json_schema: the schema the output must follow."""

    name = fields.String(required=True, validate=validate.Length(min=1, max=64))
    schema = fields.Dict(required=True)
    description = fields.String()
    strict = StrictBoolean(metadata={"description": "always enforced here"})


class ResponseFormatSchema(RequestSchema):
    """Plain text, any JSON object, or JSON following a schema; enforced by a grammar."""

    type = fields.String(
        required=True, validate=validate.OneOf(["text", "json_object", "json_schema"])
    )
    json_schema = fields.Nested(JsonSchemaSpecSchema)

    @validates_schema
    def check_spec(self, data: dict[str, Any], **_: Any) -> None:
        if (data["type"] == "json_schema") != ("json_schema" in data):
            raise ValidationError(
                'give json_schema {"name": ..., "schema": {...}} exactly with type json_schema',
                "json_schema",
            )


class OpenAISchema(SharedSchema):
    """Fields both OpenAI generation endpoints take."""

    model = fields.String(validate=validate.Length(min=1))
    temperature = StrictFloat(validate=validate.Range(min=0.0, max=2.0))
    n = StrictInteger(validate=validate.Range(min=1))
    stream_options = fields.Nested(StreamOptionsSchema)
    # Accepted and ignored: OpenAI fields that change nothing textgen generates (README).
    user = fields.String(metadata=IGNORED)
    store = StrictBoolean(metadata=IGNORED)
    metadata_ = fields.Dict(
        data_key="metadata", keys=fields.String(), values=fields.String(), metadata=IGNORED
    )
    service_tier = fields.String(metadata=IGNORED)
    reasoning_effort = fields.String(metadata=IGNORED)
    prediction = fields.Dict(metadata=IGNORED)
    modalities = fields.List(
        fields.String(validate=validate.OneOf(["text"])),
        metadata={"description": "only text is generated"},
    )

    @validates_schema
    def check_n(self, data: dict[str, Any], **_: Any) -> None:
        cap = server_caps().max_sequences
        if data.get("n", 1) > cap:
            raise ValidationError(f"must be at most {cap}", "n")
        if "stream_options" in data and not data.get("stream"):
            raise ValidationError("only allowed with stream=true", "stream_options")


@dataclass(frozen=True)
class OpenAIRequest:
    """A validated OpenAI request, ready for the engine."""

    model: str | None
    prompts: list[PromptInput]
    params: GenerationParams
    stream: bool
    include_usage: bool
    timeout: float
    echo: bool = False
    until_context: bool = False
    score_only: bool = False  # max_tokens 0: the response holds no generated token
    tools: tuple[Tool, ...] = ()  # offered to the model (none when tool_choice is "none")
    tool_mode: str = "none"  # none, auto, required, function
    # The request's settings as a Responses API response repeats them.
    echoed_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


GREEDY_BELOW = RANGES["temperature"]["min"]


def generation_params(
    data: dict[str, Any], max_tokens: int | None, logprobs: int | None, echo: bool = False
) -> GenerationParams:
    """OpenAI fields -> generation settings: temperature 0 is greedy, anything else samples.

    A temperature below the native API's least (0.01) is greedy too: that is its limit, and
    sampling at it would divide the scores into overflow.
    """
    temperature = data.get("temperature", 1.0)
    knobs = {k: data[k] for k in SHARED_KNOBS if k in data}
    if temperature < GREEDY_BELOW:
        # Clients send their defaults for every knob; with greedy decoding they mean nothing.
        for key in ("top_p", "top_k", "min_p", "seed"):
            knobs.pop(key, None)
        fields_: dict[str, Any] = {"strategy": "greedy", **knobs}
    else:
        fields_ = {"strategy": "sampling", "temperature": temperature, "top_p": 1.0, **knobs}
        fields_.setdefault("top_k", 0)
    if max_tokens is not None:
        fields_["max_new_tokens"] = max_tokens
    params = resolve(fields_)
    return dataclasses.replace(
        params,
        num_return_sequences=data.get("n", 1),
        logprobs=logprobs,
        prompt_logprobs=echo and logprobs is not None,
    )


def response_format(value: dict[str, Any] | None) -> str | None:
    """The grammar spec (JSON text) for a validated response_format, or None for plain text."""
    value = value or {}
    return grammar_spec(value.get("type", "text"), value.get("json_schema", {}).get("schema"))


def offered_tools(
    data: dict[str, Any], fmt: str | None
) -> tuple[tuple[Tool, ...], str, str | None]:
    """The tools offered to the model (none for tool_choice "none"), the tool mode, and the
    grammar spec: a call's for a required or named tool_choice, else ``fmt``."""
    mode, name = tool_mode(data)
    tools = tuple(data.get("tools", ())) if mode != "none" else ()
    if mode in ("required", "function"):
        fmt = grammar_spec("json_schema", call_schema(tools, name))
    return tools, mode, fmt


def only_tools_or_json(mode: str, fmt: dict[str, Any], field: str) -> None:
    """Tools and a JSON output format would need two grammars at once."""
    if mode != "none" and fmt.get("type", "text") != "text":
        raise ValidationError(f"give tools or a JSON {field}, not both", "tools")


def grammar_spec(kind: str, schema: dict[str, Any] | None) -> str | None:
    """What the engine's grammar compiler takes: None for text, else JSON naming the kind."""
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "json_object"})
    return json.dumps({"type": "json_schema", "schema": schema})


class CompletionSchema(OpenAISchema):
    """POST /v1/completions."""

    prompt = PromptField(required=True)
    max_tokens = StrictInteger(
        validate=validate.Range(min=0),
        metadata={"description": "0 with echo scores the prompt alone (its logprobs)"},
    )
    logprobs = StrictInteger(validate=validate.Range(min=0, max=20), allow_none=True)
    echo = StrictBoolean()
    suffix = fields.Raw(allow_none=True)
    best_of = StrictInteger(allow_none=True)

    @validates_schema
    def check_completion(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("suffix"):
            raise ValidationError("suffix (insertion) is not supported by this server", "suffix")
        if data.get("best_of") not in (None, 1, data.get("n", 1)):
            raise ValidationError("best_of other than n is not supported", "best_of")
        cap = server_caps().max_prompts
        if len(data["prompt"]) > cap:
            raise ValidationError(f"at most {cap} prompts", "prompt")
        self.check_new_tokens(data.get("max_tokens"), "max_tokens")

    @post_load
    def make_request(self, data: dict[str, Any], **_: Any) -> OpenAIRequest:
        max_tokens = data.get("max_tokens", 16)  # OpenAI's default for completions
        echo = data.get("echo", False)
        # Nothing to generate: one token is computed (the prefill gives the prompt's logprobs)
        # and then left out of the response.
        score_only = max_tokens == 0
        params = generation_params(data, max_tokens or 1, data.get("logprobs"), echo)
        return OpenAIRequest(
            model=data.get("model"),
            prompts=data["prompt"],
            params=params,
            stream=data.get("stream", False),
            include_usage=data.get("stream_options", {}).get("include_usage", False),
            timeout=self.deadline_s(data),
            echo=echo,
            score_only=score_only,
        )


class ChatCompletionSchema(OpenAISchema):
    """POST /v1/chat/completions."""

    messages = fields.List(
        fields.Nested(ChatMessageSchema), required=True, validate=validate.Length(min=1)
    )
    max_tokens = StrictInteger(validate=validate.Range(min=1), allow_none=True)
    max_completion_tokens = StrictInteger(validate=validate.Range(min=1), allow_none=True)
    logprobs = StrictBoolean()
    top_logprobs = StrictInteger(validate=validate.Range(min=0, max=20), allow_none=True)
    response_format = fields.Nested(ResponseFormatSchema)
    tools = fields.List(fields.Nested(ToolSchema), validate=validate.Length(min=1))
    tool_choice = ToolChoiceField()
    parallel_tool_calls = StrictBoolean(
        metadata={"description": "a response holds at most one call here either way"}
    )

    @validates_schema
    def check_chat(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("top_logprobs") and not data.get("logprobs"):
            raise ValidationError("needs logprobs=true", "top_logprobs")
        mode = tool_mode(data)[0]
        if mode != "none" and data.get("n", 1) > 1:
            raise ValidationError("n > 1 with tools is not supported", "n")
        only_tools_or_json(mode, data.get("response_format", {}), "response_format")
        for key in ("max_tokens", "max_completion_tokens"):
            self.check_new_tokens(data.get(key), key)

    @post_load
    def make_request(self, data: dict[str, Any], **_: Any) -> OpenAIRequest:
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        logprobs = (data.get("top_logprobs") or 0) if data.get("logprobs") else None
        messages = tuple(
            turn | {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if k in m}
            for turn, m in zip(chat_turns(data["messages"]), data["messages"], strict=True)
        )
        tools, mode, fmt = offered_tools(data, response_format(data.get("response_format")))
        params = generation_params(data, max_tokens, logprobs)
        params = dataclasses.replace(params, response_format=fmt)
        return OpenAIRequest(
            model=data.get("model"),
            prompts=[PromptInput(messages=messages, tools=tools)],
            tools=tools,
            tool_mode=mode,
            params=params,
            stream=data.get("stream", False),
            include_usage=data.get("stream_options", {}).get("include_usage", False),
            timeout=self.deadline_s(data),
            until_context=max_tokens is None,
        )
