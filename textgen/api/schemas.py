"""Request schemas: every field's type and range, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app
from marshmallow import (
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from textgen.api.fields import (
    RANGES,
    LogitBias,
    RequestSchema,
    StrictBoolean,
    StrictFloat,
    StrictInteger,
    StringOrList,
    in_range,
)
from textgen.config import Settings
from textgen.generation.postprocess import PostProcessing
from textgen.generation.presets import PRESETS
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import (
    STRATEGIES,
    GenerationParams,
    StrategyError,
    resolve_params,
)

# Knobs that mean the same in every API; they pass to resolve_params under these names.
SHARED_KNOBS = (
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "ignore_eos",
    "min_tokens",
)


def server_caps() -> Settings:
    """This server's limits, which validation narrows the static ranges with (create_app
    puts them in the app, so schemas need no constructor arguments)."""
    settings: Settings = current_app.extensions["textgen.settings"]
    return settings


class MessageSchema(RequestSchema):
    """One chat message."""

    role = fields.String(required=True, validate=validate.OneOf(["system", "user", "assistant"]))
    content: fields.Field = fields.String(required=True)


def chat_turns(messages: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Validated messages as prompts take them: role and content only (null for an
    assistant's calls), OpenAI's "developer" role as the system turn."""
    return tuple(
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m.get("content")}
        for m in messages
    )


class SharedSchema(RequestSchema):
    """Fields every generation API takes, and the server caps they must respect."""

    top_p = StrictFloat(validate=in_range("top_p"))
    top_k = StrictInteger(validate=in_range("top_k"))
    min_p = StrictFloat(validate=in_range("min_p"))
    repetition_penalty = StrictFloat(validate=in_range("repetition_penalty"))
    presence_penalty = StrictFloat(validate=in_range("presence_penalty"))
    frequency_penalty = StrictFloat(validate=in_range("frequency_penalty"))
    logit_bias = LogitBias()
    seed = StrictInteger(validate=in_range("seed"))
    stop = StringOrList(max_chars=RANGES["stop"]["max_length"])
    ignore_eos = StrictBoolean()
    min_tokens = StrictInteger(validate=in_range("min_tokens"))
    stream = StrictBoolean()
    timeout = StrictFloat(validate=in_range("timeout"))

    @validates_schema
    def check_caps(self, data: dict[str, Any], **_: Any) -> None:
        caps = server_caps()
        if len(data.get("stop", ())) > caps.max_stop_strings:
            raise ValidationError(f"at most {caps.max_stop_strings} stop strings", "stop")
        if data.get("timeout", 0) > caps.max_timeout:
            raise ValidationError(f"must be at most {caps.max_timeout} s on this server", "timeout")
        if data.get("min_tokens", 0) > caps.max_new_tokens:
            raise ValidationError(f"must be at most {caps.max_new_tokens}", "min_tokens")

    def check_new_tokens(self, value: int | None, name: str) -> None:
        """A requested number of new tokens must fit the server's cap."""
        cap = server_caps().max_new_tokens
        if value is not None and value > cap:
            raise ValidationError(f"must be at most {cap} on this server", name)

    def deadline_s(self, data: dict[str, Any]) -> float:
        return float(data.get("timeout", server_caps().max_timeout))


def resolve(fields: dict[str, Any]) -> GenerationParams:
    """resolve_params, with its errors as validation errors that name the field."""
    try:
        return resolve_params(fields)
    except StrategyError as exc:
        raise ValidationError(str(exc), exc.param) from exc


@dataclass(frozen=True)
class GenerateRequest:
    """A validated POST /generate body."""

    prompts: list[PromptInput]
    models: list[str | None]
    params: GenerationParams
    stream: bool
    timeout: float
    postprocess: PostProcessing = PostProcessing()
    preset: str | None = None
    texts: tuple[str, ...] = ()  # the prompts as the client wrote them, before any preset

    def prompt_text(self, index: int) -> str:
        """What an echo of prompt ``index`` would repeat: its text (before any preset), or a
        chat's last user message."""
        prompt = self.prompts[index]
        if prompt.messages:
            users = [m.get("content") or "" for m in prompt.messages if m["role"] == "user"]
            return str(users[-1]) if users else ""
        return self.texts[index] if index < len(self.texts) else prompt.text or ""


class PostProcessSchema(RequestSchema):
    """Post-processing of each output's text, reported in `postprocessed` when it changed it."""

    strip_prompt = StrictBoolean(
        metadata={"description": "remove an echo of the prompt at the start of the output"}
    )
    drop_repeated_lines = StrictBoolean(
        metadata={"description": "remove every line that repeats an earlier one"}
    )
    max_words = StrictInteger(
        validate=validate.Range(min=1, max=100_000),
        metadata={"description": "cut the output after this many words"},
    )

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> PostProcessing:
        return PostProcessing(**data)


class GenerateSchema(SharedSchema):
    """POST /generate: prompts or chat messages, the models, the strategy and its knobs."""

    prompt = StringOrList()
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(min=1))
    chat = StrictBoolean()
    model = fields.String(validate=validate.Length(min=1))
    models = fields.List(
        fields.String(validate=validate.Length(min=1)), validate=validate.Length(min=1)
    )
    strategy = fields.String(validate=validate.OneOf(list(STRATEGIES)))
    max_new_tokens = StrictInteger(validate=in_range("max_new_tokens"))
    max_length = StrictInteger(validate=in_range("max_length"))
    temperature = StrictFloat(validate=in_range("temperature"))
    num_beams = StrictInteger(validate=in_range("num_beams"))
    num_return_sequences = StrictInteger(validate=in_range("num_return_sequences"))
    no_repeat_ngram_size = StrictInteger(validate=in_range("no_repeat_ngram_size"))
    do_sample = StrictBoolean()
    repetition_stop = StrictInteger(validate=in_range("repetition_stop"))
    postprocess = fields.Nested(PostProcessSchema)
    preset = fields.String(validate=validate.OneOf(list(PRESETS)))

    @validates_schema
    def check_combinations(self, data: dict[str, Any], **_: Any) -> None:
        caps = server_caps()
        exclusive = (("prompt", "messages"), ("model", "models"), ("max_new_tokens", "max_length"))
        for first, second in exclusive:
            if first in data and second in data:
                raise ValidationError(f"give either {first} or {second}, not both", second)
        models = data.get("models", [])
        if len(set(models)) < len(models):
            raise ValidationError("each model may be named once", "models")
        if "prompt" not in data and "messages" not in data:
            raise ValidationError("a prompt (or chat messages) is required", "prompt")
        if "preset" in data and ("messages" in data or data.get("chat")):
            raise ValidationError(
                "presets are for plain prompts to base models; chat uses the template",
                "preset",
            )
        if data.get("repetition_stop") == 1:
            raise ValidationError("must be 0 (off) or at least 2 repeats", "repetition_stop")
        if "messages" in data and data.get("chat") is False:
            raise ValidationError("messages are always chat; drop chat=false", "chat")
        if len(data.get("prompt", ())) > caps.max_prompts:
            raise ValidationError(f"at most {caps.max_prompts} prompts per request", "prompt")
        self.check_new_tokens(data.get("max_new_tokens"), "max_new_tokens")
        sequences = data.get("num_return_sequences", 1) * data.get("num_beams", 1)
        if sequences > caps.max_sequences:
            raise ValidationError(
                f"num_return_sequences x num_beams is {sequences}; this server allows "
                f"{caps.max_sequences}",
                "num_return_sequences" if "num_return_sequences" in data else "num_beams",
            )

    @post_load
    def make_request(self, data: dict[str, Any], **_: Any) -> GenerateRequest:
        keys = ("stream", "timeout", "postprocess", "preset")
        options: dict[str, Any] = {k: data.pop(k) for k in keys if k in data}
        preset = PRESETS.get(options.get("preset", ""))
        if preset is not None and preset.stop and "stop" not in data:
            data["stop"] = list(preset.stop)
        params = resolve(data)
        texts: tuple[str, ...] = ()
        if "messages" in data:
            prompts = [PromptInput(messages=chat_turns(data["messages"]))]
        else:
            texts = tuple(data["prompt"])
            written = [preset.apply(t) if preset else t for t in texts]
            prompts = [PromptInput(text=t, chat=data.get("chat", False)) for t in written]
        models: list[str | None] = data.get("models") or [data.get("model")]
        return GenerateRequest(
            prompts=prompts,
            models=models,
            params=params,
            stream=options.get("stream", False),
            timeout=self.deadline_s(options),
            postprocess=options.get("postprocess", PostProcessing()),
            preset=preset.name if preset else None,
            texts=texts,
        )


def parameter_ranges(settings: Settings) -> dict[str, dict[str, Any]]:
    """RANGES with this server's caps filled in (for GET /strategies)."""
    ranges = {key: dict(value) for key, value in RANGES.items()}
    ranges["max_new_tokens"].update(
        max=settings.max_new_tokens, default=settings.default_max_new_tokens
    )
    ranges["min_tokens"]["max"] = settings.max_new_tokens
    ranges["num_beams"]["max"] = settings.max_sequences
    ranges["num_return_sequences"]["max"] = settings.max_sequences
    ranges["stop"]["max_items"] = settings.max_stop_strings
    ranges["timeout"].update(max=settings.max_timeout, default=settings.max_timeout)
    return ranges


@dataclass(frozen=True)
class TokenizeRequest:
    """A validated POST /tokenize body."""

    model: str | None
    prompt: PromptInput
    add_special_tokens: bool | None


class TokenizeSchema(RequestSchema):
    """A prompt, or chat messages (the chat template is applied), to turn into tokens."""

    model = fields.String(validate=validate.Length(min=1))
    prompt = fields.String()
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(min=1))
    chat = StrictBoolean()
    add_special_tokens = StrictBoolean(
        metadata={
            "description": "add the BOS/EOS the tokenizer adds (default: true for a prompt, "
            "false for chat, whose template writes its own)"
        }
    )

    @validates_schema
    def check_input(self, data: dict[str, Any], **_: Any) -> None:
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("give either prompt or messages", "prompt")

    @post_load
    def make_request(self, data: dict[str, Any], **_: Any) -> TokenizeRequest:
        if "messages" in data:
            prompt = PromptInput(messages=chat_turns(data["messages"]))
        else:
            prompt = PromptInput(text=data["prompt"], chat=data.get("chat", False))
        return TokenizeRequest(data.get("model"), prompt, data.get("add_special_tokens"))


class DetokenizeSchema(RequestSchema):
    """Token ids to turn back into text."""

    model = fields.String(validate=validate.Length(min=1))
    tokens = fields.List(StrictInteger(validate=validate.Range(min=0)), required=True)


class ModelQuerySchema(RequestSchema):
    """?model= (the default model when absent)."""

    model = fields.String(validate=validate.Length(min=1))
