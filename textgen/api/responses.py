"""Response schemas of the native API: what each route answers, for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields

from textgen.engine.results import Usage

FINISH_REASONS = ["eos", "stop", "length", "time_limit", "repetition"]


def nullable_number(description: str) -> fields.Float:
    return fields.Float(allow_none=True, metadata={"description": description})


class ErrorDetailSchema(Schema):
    message = fields.String(required=True, metadata={"description": "what went wrong"})
    type = fields.String(
        required=True, metadata={"description": "OpenAI's error type, e.g. invalid_request_error"}
    )
    param = fields.String(
        allow_none=True, metadata={"description": "the request field at fault, if one is"}
    )
    code = fields.String(
        allow_none=True, metadata={"description": "a stable, machine-readable code"}
    )


class ErrorSchema(Schema):
    """Every error textgen answers with (HTTP errors, validation, the gunicorn worker's)."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class CachedTokensSchema(Schema):
    cached_tokens = fields.Integer(
        required=True, metadata={"description": "prompt tokens continued from the prefix cache"}
    )


class UsageSchema(Schema):
    """Token counts in the OpenAI shape."""

    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    prompt_tokens_details = fields.Nested(CachedTokensSchema, required=True)


def usage_body(usage: Usage) -> dict[str, Any]:
    """A Usage in the OpenAI shape (UsageSchema)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class TimingsSchema(Schema):
    """Where the time went, from the moment the engine accepted the request."""

    queue_s = nullable_number("waiting for a batch slot")
    time_to_first_token_s = nullable_number("until the first generated token")
    generation_s = nullable_number("from admission to the last token")
    tokens_per_second = nullable_number("completion tokens / generation_s")


class OutputSchema(Schema):
    prompt_index = fields.Integer(required=True)
    index = fields.Integer(required=True, metadata={"description": "the output's number"})
    text = fields.String(required=True)
    finish_reason = fields.String(required=True, metadata={"enum": FINISH_REASONS})
    completion_tokens = fields.Integer(required=True)
    postprocessed = fields.List(
        fields.String(metadata={"enum": ["strip_prompt", "drop_repeated_lines", "max_words"]}),
        metadata={"description": "the post-processing options that changed this text"},
    )


class ModelResultSchema(Schema):
    """One model's part of a generation."""

    model = fields.String(required=True)
    outputs = fields.List(fields.Nested(OutputSchema), required=True)
    parameters = fields.Dict(
        required=True, metadata={"description": "the generation settings applied"}
    )
    usage = fields.Nested(UsageSchema, required=True)
    timings = fields.Nested(TimingsSchema, required=True)


class GenerationSchema(Schema):
    """POST /generate: each model's outputs for each prompt."""

    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["generation"]})
    created = fields.Integer(required=True)
    results = fields.List(fields.Nested(ModelResultSchema), required=True)
    usage = fields.Nested(UsageSchema, required=True)
    preset = fields.String(metadata={"description": "the prompt preset applied"})


class PresetSchema(Schema):
    name = fields.String(required=True)
    description = fields.String(required=True)
    template = fields.String(required=True, metadata={"description": "{prompt} marks the text"})
    models = fields.String(required=True, metadata={"description": "for which models"})
    stop = fields.List(fields.String(), required=True, metadata={"description": "its stops"})


class PresetListSchema(Schema):
    presets = fields.List(fields.Nested(PresetSchema), required=True)


GENERATION_EVENTS = """Server-sent events, each `data: <JSON>`:
a delta `{"model", "prompt_index", "index", "text"}` per piece of text;
a finish `{"model", "prompt_index", "index", "text", "finish_reason", "completion_tokens"}`
per output (its text is what post-processing held back, else "", and `postprocessed` names
the options that changed the output); a summary `{"id", "object", "created", "usage",
"results": [{"model", "parameters", "usage", "timings"}]}`; then `data: [DONE]`. `: ping`
comments keep a quiet stream open. An error after the stream started is an event
`{"error": {...}}`, then `data: [DONE]`."""


class TokenizeResponseSchema(Schema):
    model = fields.String(required=True)
    tokens = fields.List(fields.Integer(), required=True)
    pieces = fields.List(fields.String(), required=True)
    count = fields.Integer(required=True)
    max_model_len = fields.Integer(allow_none=True, required=True)


class DetokenizeResponseSchema(Schema):
    model = fields.String(required=True)
    prompt = fields.String(required=True)
    pieces = fields.List(fields.String(), required=True)


class TokenizerInfoSchema(Schema):
    model = fields.String(required=True)
    tokenizer_class = fields.String(required=True)
    bos_token = fields.String(allow_none=True, required=True)
    eos_token = fields.String(allow_none=True, required=True)
    pad_token = fields.String(allow_none=True, required=True)
    unk_token = fields.String(allow_none=True, required=True)
    chat_template = fields.String(allow_none=True, required=True)
    model_max_length = fields.Integer(allow_none=True, required=True)
    vocab_size = fields.Integer(required=True)


class HealthSchema(Schema):
    """Loading state: ok once every model is loaded and warmed up."""

    status = fields.String(
        required=True, metadata={"enum": ["ok", "idle", "loading", "failed", "draining"]}
    )
    detail = fields.String(required=True)
    models = fields.List(fields.String(), required=True, metadata={"description": "loaded"})
    ready_after_s = nullable_number("seconds from start to ready")


class LivenessSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["alive"]})
    pid = fields.Integer(required=True)


class ModelEntrySchema(Schema):
    """A configured model: its loaded facts, or its spec while it loads."""

    name = fields.String(required=True)
    source = fields.String(required=True)
    kind = fields.String(required=True, metadata={"enum": ["embedded", "hub", "local_dir", "gguf"]})
    revision = fields.String(allow_none=True)
    trust_remote_code = fields.Boolean()
    architecture = fields.String()
    parameters = fields.Integer()
    dtype = fields.String(required=True)
    decode_weight_bytes = fields.Integer()
    compiled = fields.Boolean()
    context_length = fields.Integer(allow_none=True)
    chat_template = fields.Boolean()
    vocab_size = fields.Integer()
    status = fields.String(required=True)


class ModelListSchema(Schema):
    default = fields.String(required=True, metadata={"description": "used when none is named"})
    models = fields.List(fields.Nested(ModelEntrySchema), required=True)


class StrategySchema(Schema):
    name = fields.String(required=True)
    description = fields.String(required=True)
    settings = fields.Dict(required=True, metadata={"description": "what the strategy fixes"})
    parameters = fields.Dict(
        required=True, metadata={"description": "each parameter's type, range and default"}
    )


class StrategyListSchema(Schema):
    strategies = fields.List(fields.Nested(StrategySchema), required=True)


class TorchInfoSchema(Schema):
    version = fields.String(required=True)
    threads = fields.Integer(required=True)
    interop_threads = fields.Integer(required=True)


class InfoSchema(Schema):
    """This worker: versions, threads, settings, engine counters and memory (with auth on,
    only the version for a request without credentials)."""

    version = fields.String(required=True)
    pid = fields.Integer()
    torch = fields.Nested(TorchInfoSchema)
    transformers = fields.String()
    settings = fields.Dict()
    engines = fields.Dict(metadata={"description": "per model"})
    memory = fields.Dict()
