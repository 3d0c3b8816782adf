"""Function calling without a model: prompts that offer tools, the grammar of a call, and
reading a call back out of the model's text (pure)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# The tag Hermes/Qwen-style templates wrap a call in; some models write it unasked.
CALL_TAG = re.compile(r"^\s*<tool_call>\s*(.*?)\s*(?:</tool_call>\s*)?$", re.DOTALL)
FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def of(cls, name: str, description: str | None, parameters: dict[str, Any] | None) -> Tool:
        """A tool as a request declares it; no parameters means none."""
        return cls(name, description or "", parameters or {"type": "object", "properties": {}})

    def openai(self) -> dict[str, Any]:
        """The OpenAI tool object chat templates take (``apply_chat_template(tools=...)``)."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": function | {"parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


def call_schema(tools: tuple[Tool, ...], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of a call ``{"name": ..., "arguments": {...}}``: to the named function,
    or to any of them. A grammar built from it makes even a small model's call valid."""

    def one(tool: Tool) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    chosen = [tool for tool in tools if name is None or tool.name == name]
    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(tool) for tool in chosen]}


def system_prompt(tools: tuple[Tool, ...]) -> str:
    """The generic tool prompt, for chat templates that do not render tools themselves: the
    functions, and the call's form shown on the first one (small models follow an example far
    more often than a description; bench/tools.py)."""
    listing = "\n".join(json.dumps(tool.openai()["function"], ensure_ascii=False) for tool in tools)
    return (
        "You are a helpful assistant with access to these functions:\n"
        f"{listing}\n\n"
        "If a function can answer the user, do not answer yourself: reply with only a JSON "
        f"object that calls it, such as {json.dumps(example_call(tools[0]))}. "
        "Otherwise, answer normally."
    )


def example_call(tool: Tool) -> dict[str, Any]:
    """A call to ``tool`` with placeholder arguments, to show the form of a call."""
    properties = tool.parameters.get("properties", {}) if isinstance(tool.parameters, dict) else {}
    required = tool.parameters.get("required", list(properties)) if properties else []
    placeholders = {"number": 1, "integer": 1, "boolean": True, "array": [], "object": {}}
    arguments = {
        key: placeholders.get(str(properties.get(key, {}).get("type")), "...") for key in required
    }
    return {"name": tool.name, "arguments": arguments}


def generic_turns(messages: list[dict[str, Any]], tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """A conversation with tools for a template that knows only system, user and assistant:
    the tools described in the system turn, calls written as the JSON the prompt asks for,
    and tool results as user turns."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [call_text(call) for call in message["tool_calls"]]
            turns.append({"role": "assistant", "content": "\n".join([content, *calls]).strip()})
        elif role == "tool":
            name = message.get("name") or message.get("tool_call_id") or "the function"
            turns.append({"role": "user", "content": f"Result of {name}: {content}"})
        else:
            turns.append({"role": role, "content": content})
    if tools:
        prompt = system_prompt(tools)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def call_text(call: dict[str, Any]) -> str:
    """An assistant's earlier call (OpenAI's shape) as the JSON the generic prompt asks for."""
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = arguments
    return json.dumps({"name": function["name"], "arguments": parsed}, ensure_ascii=False)


def starts_call(text: str) -> bool:
    """Whether an answer begins as a call (a JSON object, or a <tool_call> tag)."""
    head = text.lstrip()
    return head.startswith(("{", "<tool_call>", "```"))


def parse_call(text: str, tools: tuple[Tool, ...]) -> ToolCall | None:
    """The call an answer holds, or None when it is not a call to one of ``tools``."""
    for pattern in (CALL_TAG, FENCE):
        match = pattern.match(text)
        if match:
            text = match.group(1)
    try:
        # strict=False: a grammar's JSON strings may hold raw control characters, which the
        # call's arguments then carry escaped (json.dumps).
        value = json.loads(text, strict=False)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("arguments"), dict):
        return None
    if value.get("name") not in {tool.name for tool in tools}:
        return None
    return ToolCall(value["name"], value["arguments"])
