"""Field types of the OpenAI request schemas: prompts and message contents (pure)."""

from __future__ import annotations

from typing import Any

from marshmallow import fields

from textgen.generation.prompts import PromptInput


class PromptField(fields.Field):
    """A string, a list of strings, a list of token ids, or a list of such lists."""

    default_error_messages = {
        "invalid": "Must be a string, a list of strings, or token ids (a list of integers, "
        "or a list of such lists).",
        "empty": "Must not be empty.",
    }

    def __init__(self, **kwargs: Any) -> None:
        ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
        text = {"type": "string", "minLength": 1}
        kwargs.setdefault(
            "metadata",
            {
                "oneOf": [
                    text,
                    {"type": "array", "items": text, "minItems": 1},
                    ids,
                    {"type": "array", "items": ids, "minItems": 1},
                ]
            },
        )
        super().__init__(**kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> list[PromptInput]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.make_error("invalid" if not isinstance(value, list) else "empty")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = [value]
        prompts = []
        for item in value:
            if isinstance(item, str) and item:
                prompts.append(PromptInput(text=item))
            elif (
                isinstance(item, list)
                and item
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
            ):
                prompts.append(PromptInput(token_ids=tuple(item)))
            else:
                raise self.make_error("empty" if item in ("", []) else "invalid")
        return prompts


class MessageContentField(fields.Field):
    """Message content: a string, or a list of text parts (other part types are refused)."""

    default_error_messages = {
        # Literal braces doubled: marshmallow formats these messages with str.format.
        "invalid": "Must be a string or a list of {{'type': 'text', 'text': ...}} parts.",
        "unsupported": "Only text content parts are supported; got type {kind!r}.",
    }

    def __init__(self, **kwargs: Any) -> None:
        part = {
            "type": "object",
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
            "required": ["type", "text"],
        }
        kwargs.setdefault(
            "metadata", {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]}
        )
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise self.make_error("invalid")
        texts = []
        for part in value:
            if not isinstance(part, dict) or "type" not in part:
                raise self.make_error("invalid")
            if part["type"] != "text":
                raise self.make_error("unsupported", kind=part["type"])
            if not isinstance(part.get("text"), str):
                raise self.make_error("invalid")
            texts.append(part["text"])
        return "".join(texts)
