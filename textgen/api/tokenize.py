"""POST /tokenize and /detokenize: the model's tokenizer over HTTP, for counting and debugging."""

from __future__ import annotations

from typing import Any

from marshmallow import (
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from textgen.api import current_registry
from textgen.api.docs import READS_MODEL, Blueprint
from textgen.api.fields import RequestSchema, StrictBoolean, StrictInteger
from textgen.api.responses import DetokenizeResponseSchema, TokenizeResponseSchema
from textgen.api.schemas import MessageSchema, chat_turns
from textgen.errors import context_exceeded
from textgen.generation.prompts import PromptInput

bp = Blueprint(
    "tokenize", __name__, description="The model's tokenizer, for counting and debugging"
)


class TokenizeSchema(RequestSchema):
    """A prompt, or chat messages (the chat template is applied), to turn into tokens."""

    model = fields.String(validate=validate.Length(min=1))
    prompt = fields.String()
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(min=1))
    chat = StrictBoolean()

    @validates_schema
    def check_input(self, data: dict[str, Any], **_: Any) -> None:
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("give either prompt or messages", "prompt")

    @post_load
    def make_prompt(self, data: dict[str, Any], **_: Any) -> tuple[str | None, PromptInput]:
        if "messages" in data:
            return data.get("model"), PromptInput(messages=chat_turns(data["messages"]))
        return data.get("model"), PromptInput(text=data["prompt"], chat=data.get("chat", False))


class DetokenizeSchema(RequestSchema):
    """Token ids to turn back into text."""

    model = fields.String(validate=validate.Length(min=1))
    tokens = fields.List(StrictInteger(validate=validate.Range(min=0)), required=True)


@bp.post("/tokenize")
@bp.arguments(TokenizeSchema, example={"prompt": "Hello world"})
@bp.response(200, TokenizeResponseSchema)
@bp.errors(*READS_MODEL)
def tokenize(body: tuple[str | None, PromptInput]) -> dict[str, Any]:
    """Turn a prompt (or chat messages, through the chat template) into token ids.

    Gives the ids, their pieces and count, and the model's context length.
    """
    model, prompt = body
    runner = current_registry().engine(model).runner
    ids = runner.tokenize(prompt)
    cap = runner.limits.max_prompt_tokens
    if len(ids) > cap:
        raise context_exceeded(cap, len(ids), None, prompt.is_chat)
    tokenizer = runner.loaded.tokenizer
    return {
        "model": runner.name,
        "tokens": ids,
        "pieces": tokenizer.convert_ids_to_tokens(ids),
        "count": len(ids),
        "max_model_len": runner.loaded.context_length,
    }


@bp.post("/detokenize")
@bp.arguments(DetokenizeSchema, example={"tokens": [19556, 905]})
@bp.response(200, DetokenizeResponseSchema)
@bp.errors(*READS_MODEL)
def detokenize(body: dict[str, Any]) -> dict[str, Any]:
    """Turn token ids back into text, with each token's piece."""
    runner = current_registry().engine(body.get("model")).runner
    tokenizer = runner.loaded.tokenizer
    if len(body["tokens"]) > runner.limits.max_prompt_tokens:
        cap = runner.limits.max_prompt_tokens
        raise ValidationError(f"at most {cap} token ids", "tokens")
    if any(token >= len(tokenizer) for token in body["tokens"]):
        raise ValidationError(f"token ids must be below {len(tokenizer)}", "tokens")
    return {
        "model": runner.name,
        "prompt": tokenizer.decode(body["tokens"]),
        "pieces": tokenizer.convert_ids_to_tokens(body["tokens"]),
    }
