"""Request schemas: every field's type and range, declared once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flask import request
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from textgen.api.errors import InvalidRequest
from textgen.config import Settings
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import (
    STRATEGIES,
    GenerationParams,
    StrategyError,
    resolve_params,
)

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
    "seed": {"type": "integer", "min": 0, "max": 2**63 - 1},
    "stop": {"type": "string or list of strings", "max_length": 256},
    "timeout": {"type": "number", "min_exclusive": 0.0},
    "ignore_eos": {"type": "boolean", "default": False},
}


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


class MessageSchema(Schema):
    """One chat message."""

    class Meta:
        unknown = RAISE

    role = fields.String(required=True, validate=validate.OneOf(["system", "user", "assistant"]))
    content = fields.String(required=True)


def _range(name: str) -> validate.Range:
    spec = RANGES[name]
    if "min_exclusive" in spec:
        return validate.Range(min=spec["min_exclusive"], max=spec.get("max"), min_inclusive=False)
    return validate.Range(min=spec.get("min"), max=spec.get("max"))


@dataclass(frozen=True)
class GenerateRequest:
    """A validated POST /generate body."""

    prompts: list[PromptInput]
    models: list[str | None]
    params: GenerationParams
    stream: bool
    timeout: float


class GenerateSchema(Schema):
    """POST /generate. Caps come from the server's settings."""

    class Meta:
        unknown = RAISE

    prompt = StringOrList()
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(min=1))
    chat = StrictBoolean()
    model = fields.String(validate=validate.Length(min=1))
    models = fields.List(
        fields.String(validate=validate.Length(min=1)), validate=validate.Length(min=1)
    )
    strategy = fields.String(validate=validate.OneOf(list(STRATEGIES)))
    max_new_tokens = StrictInteger(validate=_range("max_new_tokens"))
    max_length = StrictInteger(validate=_range("max_length"))
    temperature = StrictFloat(validate=_range("temperature"))
    top_p = StrictFloat(validate=_range("top_p"))
    top_k = StrictInteger(validate=_range("top_k"))
    num_beams = StrictInteger(validate=_range("num_beams"))
    num_return_sequences = StrictInteger(validate=_range("num_return_sequences"))
    repetition_penalty = StrictFloat(validate=_range("repetition_penalty"))
    no_repeat_ngram_size = StrictInteger(validate=_range("no_repeat_ngram_size"))
    do_sample = StrictBoolean()
    seed = StrictInteger(validate=_range("seed"))
    stop = StringOrList(max_chars=RANGES["stop"]["max_length"])
    ignore_eos = StrictBoolean()
    stream = StrictBoolean()
    timeout = StrictFloat(validate=_range("timeout"))

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    @validates_schema
    def check_combinations(self, data: dict[str, Any], **_: Any) -> None:
        caps = self.settings
        exclusive = (("prompt", "messages"), ("model", "models"), ("max_new_tokens", "max_length"))
        for first, second in exclusive:
            if first in data and second in data:
                raise ValidationError(f"give either {first} or {second}, not both", second)
        if "prompt" not in data and "messages" not in data:
            raise ValidationError("a prompt (or chat messages) is required", "prompt")
        if "messages" in data and data.get("chat") is False:
            raise ValidationError("messages are always chat; drop chat=false", "chat")
        if len(data.get("prompt", ())) > caps.max_prompts:
            raise ValidationError(f"at most {caps.max_prompts} prompts per request", "prompt")
        if len(data.get("stop", ())) > caps.max_stop_strings:
            raise ValidationError(f"at most {caps.max_stop_strings} stop strings", "stop")
        if data.get("max_new_tokens", 0) > caps.max_new_tokens:
            raise ValidationError(
                f"must be at most {caps.max_new_tokens} on this server", "max_new_tokens"
            )
        if data.get("timeout", 0) > caps.max_timeout:
            raise ValidationError(f"must be at most {caps.max_timeout} s on this server", "timeout")
        sequences = data.get("num_return_sequences", 1) * data.get("num_beams", 1)
        if sequences > caps.max_sequences:
            raise ValidationError(
                f"num_return_sequences x num_beams is {sequences}; this server allows "
                f"{caps.max_sequences}",
                "num_return_sequences" if "num_return_sequences" in data else "num_beams",
            )

    @post_load
    def make_request(self, data: dict[str, Any], **_: Any) -> GenerateRequest:
        options = {k: data.pop(k) for k in ("stream", "timeout") if k in data}
        try:
            params = resolve_params(data)
        except StrategyError as exc:
            raise ValidationError(str(exc), exc.param) from exc
        if "messages" in data:
            messages = tuple({"role": m["role"], "content": m["content"]} for m in data["messages"])
            prompts = [PromptInput(messages=messages)]
        else:
            prompts = [PromptInput(text=t, chat=data.get("chat", False)) for t in data["prompt"]]
        models: list[str | None] = data.get("models") or [data.get("model")]
        return GenerateRequest(
            prompts=prompts,
            models=models,
            params=params,
            stream=options.get("stream", False),
            timeout=options.get("timeout", self.settings.max_timeout),
        )


def parameter_ranges(settings: Settings) -> dict[str, dict[str, Any]]:
    """RANGES with this server's caps filled in (for GET /strategies)."""
    ranges = {key: dict(value) for key, value in RANGES.items()}
    ranges["max_new_tokens"].update(
        max=settings.max_new_tokens, default=settings.default_max_new_tokens
    )
    ranges["num_beams"]["max"] = settings.max_sequences
    ranges["num_return_sequences"]["max"] = settings.max_sequences
    ranges["stop"]["max_items"] = settings.max_stop_strings
    ranges["timeout"].update(max=settings.max_timeout, default=settings.max_timeout)
    return ranges


def load_body(schema: Schema) -> Any:
    """Parse the request's JSON object body with a schema; any problem is a 400 naming it."""
    # force: curl -d sends form encoding unless told otherwise; the body is JSON regardless.
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise InvalidRequest(
            "the body must be JSON (Content-Type: application/json)", code="invalid_json"
        )
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    return schema.load(body)
