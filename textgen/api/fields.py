"""Field types and ranges shared by every request schema."""

from __future__ import annotations

import math
import re
from typing import Any

from marshmallow import RAISE, Schema, fields, pre_load, validate

# Static ranges; the server's caps (settings) narrow the upper bounds at validation time.
RANGES: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"type": "integer", "min": 1},
    "max_length": {"type": "integer", "min": 1},
    "temperature": {"type": "number", "min": 0.01, "max": 5.0},
    "top_p": {"type": "number", "min_exclusive": 0.0, "max": 1.0},
    "top_k": {"type": "integer", "min": 0, "max": 1000},
    "num_beams": {"type": "integer", "min": 1},
    "num_return_sequences": {"type": "integer", "min": 1},
    "repetition_penalty": {"type": "number", "min": 0.01, "max": 10.0},
    "no_repeat_ngram_size": {"type": "integer", "min": 0, "max": 64},
    "seed": {"type": "integer", "min": -(2**63), "max": 2**63 - 1},
    "stop": {"type": "string or list of strings", "max_length": 256},
    "timeout": {"type": "number", "min_exclusive": 0.0},
    "ignore_eos": {"type": "boolean", "default": False},
    "min_p": {"type": "number", "min": 0.0, "max": 1.0},
    "presence_penalty": {"type": "number", "min": -2.0, "max": 2.0},
    "frequency_penalty": {"type": "number", "min": -2.0, "max": 2.0},
    "logit_bias": {
        "type": "object: token id -> bias",
        "min": -100.0,
        "max": 100.0,
        "max_items": 300,
    },
    "min_tokens": {"type": "integer", "min": 0},
    # An output that ends with one block of tokens written this many times in a row ends
    # there (finish_reason "repetition"); 0: never.
    "repetition_stop": {"type": "integer", "min": 0, "max": 64, "default": 0},
}


TOKEN_ID = re.compile(r"[0-9]{1,10}")


class RequestSchema(Schema):
    """A request body (or an object in one): unknown keys are refused, and an explicit null
    for an optional field means "not given", as OpenAI's API has it (LangChain's clients send
    ``"seed": null``)."""

    class Meta:
        unknown = RAISE

    def on_bind_field(self, field_name: str, field_obj: fields.Field) -> None:
        # So the OpenAPI document says that null is accepted.
        if not field_obj.required:
            field_obj.allow_none = True

    @pre_load
    def drop_nulls(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StrictInteger(fields.Integer):
    """An integer that must arrive as a JSON integer (no strings, floats or booleans)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return value


class StrictFloat(fields.Float):
    """A finite number that must arrive as a JSON number."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.make_error("invalid")
        return float(value)


class StrictBoolean(fields.Boolean):
    """true or false, nothing else."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StringOrList(fields.Field):
    """A non-empty string, or a non-empty list of non-empty strings; loads as a list."""

    default_error_messages = {
        "invalid": "Must be a string or a list of strings.",
        "empty": "Must not be empty.",
        "too_long": "Each string may have at most {max} characters.",
    }

    def __init__(self, max_chars: int | None = None, **kwargs: Any) -> None:
        text: dict[str, Any] = {"type": "string", "minLength": 1}
        if max_chars is not None:
            text["maxLength"] = max_chars
        kwargs.setdefault(
            "metadata", {"oneOf": [text, {"type": "array", "items": text, "minItems": 1}]}
        )
        super().__init__(**kwargs)
        self.max_chars = max_chars

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise self.make_error("invalid")
        if not items or any(not item for item in items):
            raise self.make_error("empty")
        if self.max_chars is not None and any(len(item) > self.max_chars for item in items):
            raise self.make_error("too_long", max=self.max_chars)
        return items


def in_range(name: str) -> validate.Range:
    spec = RANGES[name]
    if "min_exclusive" in spec:
        return validate.Range(min=spec["min_exclusive"], max=spec.get("max"), min_inclusive=False)
    return validate.Range(min=spec.get("min"), max=spec.get("max"))


class LogitBias(fields.Field):
    """{"token id": bias}: keys are token ids as strings (JSON), biases within the range."""

    default_error_messages = {
        "invalid": "Must be an object mapping token ids to numbers.",
        "range": "Biases must be between {min} and {max}.",
        "too_many": "At most {max} entries.",
    }

    def __init__(self, **kwargs: Any) -> None:
        spec = RANGES["logit_bias"]
        bias = {"type": "number", "minimum": spec["min"], "maximum": spec["max"]}
        kwargs.setdefault(
            "metadata",
            {
                "type": "object",
                "description": "token id (as a string) -> bias added to its logit",
                "additionalProperties": bias,
                "maxProperties": spec["max_items"],
            },
        )
        super().__init__(**kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> dict[int, float]:
        spec = RANGES["logit_bias"]
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        if len(value) > spec["max_items"]:
            raise self.make_error("too_many", max=spec["max_items"])
        out: dict[int, float] = {}
        for key, bias in value.items():
            # ASCII digits only: str.isdigit() also takes "²" and "١٢" (int() of the
            # latter is 12), and a token id has at most 10 of them.
            if (
                not TOKEN_ID.fullmatch(str(key))
                or isinstance(bias, bool)
                or not isinstance(bias, int | float)
            ):
                raise self.make_error("invalid")
            if not spec["min"] <= bias <= spec["max"]:
                raise self.make_error("range", min=spec["min"], max=spec["max"])
            out[int(key)] = float(bias)
        return out
