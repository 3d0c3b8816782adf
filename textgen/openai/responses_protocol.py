"""POST /v1/responses (OpenAI's Responses API, stateless): the request schema, and its mapping
onto a chat request (messages, tools, settings) that the chat machinery answers."""

from __future__ import annotations

import dataclasses
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from textgen.api.fields import RequestSchema, StrictBoolean, StrictFloat, StrictInteger
from textgen.api.schemas import SharedSchema
from textgen.generation.prompts import PromptInput
from textgen.generation.tools import Tool
from textgen.openai.protocol import (
    IGNORED,
    OpenAIRequest,
    generation_params,
    grammar_spec,
    offered_tools,
    only_tools_or_json,
)
from textgen.openai.tool_schemas import FUNCTION_NAME, tool_mode

ROLES = ["system", "developer", "user", "assistant"]
TEXT_PARTS = ("input_text", "output_text", "text")


class InputField(fields.Field):
    """A string, or a list of input items: messages ({"role", "content"}, content a string or
    text parts), function calls and their outputs. Loads as chat messages."""

    default_error_messages = {
        "invalid": "Must be a string or a list of message, function_call and "
        "function_call_output items.",
        "item": "Item {index} is not a supported input item ({reason}).",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("metadata", {"oneOf": [{"type": "string"}, {"type": "array"}]})
        super().__init__(**kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> list[dict[str, Any]]:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list) or not value:
            raise self.make_error("invalid")
        return [self.item(index, item) for index, item in enumerate(value)]

    def item(self, index: int, item: Any) -> dict[str, Any]:
        def bad(reason: str) -> ValidationError:
            return self.make_error("item", index=index, reason=reason)

        if not isinstance(item, dict):
            raise bad("not an object")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise bad(f"role must be one of {', '.join(ROLES)}")
            role = "system" if item["role"] == "developer" else item["role"]
            return {"role": role, "content": self.text(item.get("content"), bad)}
        if kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad("a function_call needs call_id, name and arguments (strings)")
            function = {"name": item["name"], "arguments": item["arguments"]}
            call = {"id": item["call_id"], "type": "function", "function": function}
            return {"role": "assistant", "content": None, "tool_calls": [call]}
        if kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise bad("a function_call_output needs call_id and output (strings)")
            return {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
        raise bad(f"type {kind!r}")

    @staticmethod
    def text(content: Any, bad: Any) -> str:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise bad("content must be a string or text parts")
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                raise bad("only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise bad("a text part needs text")
            texts.append(part["text"])
        return "".join(texts)


class FormatSchema(RequestSchema):
    """text.format: plain text, any JSON object, or JSON following a schema."""

    type = fields.String(
        required=True, validate=validate.OneOf(["text", "json_object", "json_schema"])
    )
    name = fields.String(validate=validate.Length(min=1, max=64))
    schema = fields.Dict()
    description = fields.String()
    strict = StrictBoolean()

    @validates_schema
    def check_schema(self, data: dict[str, Any], **_: Any) -> None:
        if (data["type"] == "json_schema") != ("schema" in data):
            raise ValidationError("give a schema exactly with type json_schema", "schema")


class TextSchema(RequestSchema):
    format = fields.Nested(FormatSchema)
    verbosity = fields.String(metadata=IGNORED)


class FunctionToolSchema(RequestSchema):
    """A function tool, as the Responses API writes it (flat: no "function" wrapper)."""

    type = fields.String(required=True, validate=validate.OneOf(["function"]))
    name = fields.String(required=True, validate=FUNCTION_NAME)
    description = fields.String(validate=validate.Length(max=4096))
    parameters = fields.Dict()
    strict = StrictBoolean()

    @post_load
    def make_tool(self, data: dict[str, Any], **_: Any) -> Tool:
        return Tool.of(data["name"], data.get("description"), data.get("parameters"))


class ResponseToolChoiceField(fields.Field):
    """ "none", "auto", "required" or {"type": "function", "name": ...}."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> tuple[str, str | None]:
        if value in ("none", "auto", "required"):
            return value, None
        if isinstance(value, dict) and value.get("type") == "function":
            if set(value) == {"type", "name"} and isinstance(value["name"], str):
                return "function", value["name"]
        raise ValidationError('Must be "none", "auto", "required" or {"type": "function", ...}.')


class ResponsesSchema(SharedSchema):
    """POST /v1/responses."""

    model = fields.String(validate=validate.Length(min=1))
    input = InputField(required=True)
    instructions = fields.String(metadata={"description": "a system message before the input"})
    max_output_tokens = StrictInteger(validate=validate.Range(min=1))
    temperature = StrictFloat(validate=validate.Range(min=0.0, max=2.0))
    text = fields.Nested(TextSchema)
    tools = fields.List(fields.Nested(FunctionToolSchema), validate=validate.Length(min=1))
    tool_choice = ResponseToolChoiceField()
    parallel_tool_calls = StrictBoolean(metadata={"description": "at most one call here"})
    previous_response_id = fields.String(
        metadata={"description": "refused: this server stores no responses"}
    )
    store = StrictBoolean(metadata={"description": "accepted; nothing is stored"})
    metadata_ = fields.Dict(
        data_key="metadata", keys=fields.String(), values=fields.String(), metadata=IGNORED
    )
    user = fields.String(metadata=IGNORED)
    service_tier = fields.String(metadata=IGNORED)
    reasoning = fields.Dict(metadata=IGNORED)
    truncation = fields.String(validate=validate.OneOf(["disabled"]))

    @validates_schema
    def check_response(self, data: dict[str, Any], **_: Any) -> None:
        if "previous_response_id" in data:
            raise ValidationError(
                "this server stores no responses: send the whole conversation as input",
                "previous_response_id",
            )
        self.check_new_tokens(data.get("max_output_tokens"), "max_output_tokens")
        only_tools_or_json(
            tool_mode(data)[0], data.get("text", {}).get("format", {}), "text.format"
        )

    @post_load
    def make_request(self, data: dict[str, Any], **_: Any) -> OpenAIRequest:
        messages = list(data["input"])
        if "instructions" in data:
            messages.insert(0, {"role": "system", "content": data["instructions"]})
        tools, mode, fmt = offered_tools(data, text_format(data.get("text", {}).get("format")))
        name = tool_mode(data)[1]
        params = generation_params(data, data.get("max_output_tokens"), None)
        return OpenAIRequest(
            model=data.get("model"),
            prompts=[PromptInput(messages=tuple(messages), tools=tools)],
            params=dataclasses.replace(params, response_format=fmt),
            stream=data.get("stream", False),
            include_usage=True,
            timeout=self.deadline_s(data),
            until_context="max_output_tokens" not in data,
            tools=tools,
            tool_mode=mode,
            echoed_settings={
                "instructions": data.get("instructions"),
                "max_output_tokens": data.get("max_output_tokens"),
                "temperature": data.get("temperature", 1.0),
                "top_p": data.get("top_p", 1.0),
                "tool_choice": mode if name is None else {"type": "function", "name": name},
                "tools": [tool.openai()["function"] | {"type": "function"} for tool in tools],
                "text": {"format": data.get("text", {}).get("format", {"type": "text"})},
            },
        )


def text_format(value: dict[str, Any] | None) -> str | None:
    """The grammar spec (JSON text) for text.format, or None for plain text."""
    value = value or {}
    return grammar_spec(value.get("type", "text"), value.get("schema"))
