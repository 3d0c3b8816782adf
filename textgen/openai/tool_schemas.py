"""Request schemas of OpenAI function calling: tools, tool_choice, and calls in the history."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, post_load, validate

from textgen.api.fields import RequestSchema, StrictBoolean
from textgen.generation.tools import Tool

FUNCTION_NAME = validate.Regexp(r"^[A-Za-z0-9_-]{1,64}$", error="1-64 letters, digits, _ or -")
MAX_TOOLS = 64


class FunctionSchema(RequestSchema):
    name = fields.String(required=True, validate=FUNCTION_NAME)
    description = fields.String(validate=validate.Length(max=4096))
    parameters = fields.Dict(metadata={"description": "the arguments' JSON schema"})
    strict = StrictBoolean(metadata={"description": "calls are always grammar-checked here"})


class ToolSchema(RequestSchema):
    """A function the model may call."""

    type = fields.String(required=True, validate=validate.OneOf(["function"]))
    function = fields.Nested(FunctionSchema, required=True)

    @post_load
    def make_tool(self, data: dict[str, Any], **_: Any) -> Tool:
        function = data["function"]
        return Tool.of(function["name"], function.get("description"), function.get("parameters"))


class CalledFunctionSchema(RequestSchema):
    name = fields.String(required=True, validate=FUNCTION_NAME)
    arguments = fields.String(required=True, metadata={"description": "a JSON object, as text"})


class ToolCallSchema(RequestSchema):
    """A call an assistant made earlier in the conversation."""

    id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    type = fields.String(required=True, validate=validate.OneOf(["function"]))
    function = fields.Nested(CalledFunctionSchema, required=True)


class ToolChoiceField(fields.Field):
    """ "none", "auto", "required", or {"type": "function", "function": {"name": ...}}; loads as
    (mode, function name or None)."""

    default_error_messages = {
        "invalid": 'Must be "none", "auto", "required" or '
        '{{"type": "function", "function": {{"name": ...}}}}.',
    }

    def __init__(self, **kwargs: Any) -> None:
        named = {
            "type": "object",
            "properties": {
                "type": {"enum": ["function"]},
                "function": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        }
        kwargs.setdefault("metadata", {"oneOf": [{"enum": ["none", "auto", "required"]}, named]})
        super().__init__(**kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> tuple[str, str | None]:
        if value in ("none", "auto", "required"):
            return value, None
        if (
            isinstance(value, dict)
            and set(value) == {"type", "function"}
            and value["type"] == "function"
            and isinstance(value["function"], dict)
            and set(value["function"]) == {"name"}
            and isinstance(value["function"]["name"], str)
        ):
            return "function", value["function"]["name"]
        raise self.make_error("invalid")


def tool_mode(data: dict[str, Any]) -> tuple[str, str | None]:
    """How a chat request uses its tools: ("none" | "auto" | "required" | "function", name).
    OpenAI's default is "auto" when tools are given."""
    tools: list[Tool] = data.get("tools", [])
    if len(tools) > MAX_TOOLS:
        raise ValidationError(f"at most {MAX_TOOLS} tools", "tools")
    if len({tool.name for tool in tools}) < len(tools):
        raise ValidationError("each tool needs a name of its own", "tools")
    if "tool_choice" not in data:
        return ("auto" if tools else "none"), None
    mode, name = data["tool_choice"]
    if mode != "none" and not tools:
        raise ValidationError("tool_choice needs tools", "tool_choice")
    if name is not None and name not in {tool.name for tool in tools}:
        raise ValidationError(f"no tool is named {name!r}", "tool_choice")
    return mode, name
