"""POST /tokenize and /detokenize, GET /tokenizer_info: the model's tokenizer over HTTP, for
counting, debugging and clients that tokenize on the server (lm-evaluation-harness)."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError

from textgen.api import current_engine
from textgen.api.docs import READS_MODEL, Blueprint
from textgen.api.responses import (
    DetokenizeResponseSchema,
    TokenizeResponseSchema,
    TokenizerInfoSchema,
)
from textgen.api.schemas import DetokenizeSchema, ModelQuerySchema, TokenizeRequest, TokenizeSchema
from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.errors import context_exceeded

bp = Blueprint("tokenize", __name__, description="The model's tokenizer, for counting, debugging")


def readable_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, as llama.cpp's /tokenize shows it: " world", not the
    byte-level symbol "Ġworld". A token that ends inside a character adds "", and the token
    that completes it carries the whole character."""
    detokenizer = IncrementalDetokenizer(lambda part: str(tokenizer.decode(part)))
    pieces = [detokenizer.push(token) for token in ids]
    if pieces:
        pieces[-1] += detokenizer.flush()
    return pieces


@bp.post("/tokenize")
@bp.arguments(TokenizeSchema, example={"prompt": "Hello world"})
@bp.response(200, TokenizeResponseSchema)
@bp.errors(*READS_MODEL)
def tokenize(body: TokenizeRequest) -> dict[str, Any]:
    """Turn a prompt (or chat messages, through the chat template) into token ids.

    Gives the ids, the text each adds, their count, and the model's context length.
    """
    runner = current_engine(body.model).runner
    ids = runner.tokenize(body.prompt, body.add_special_tokens)
    cap = runner.limits.max_prompt_tokens
    if len(ids) > cap:
        raise context_exceeded(cap, len(ids), None, body.prompt.is_chat)
    tokenizer = runner.loaded.tokenizer
    return {
        "model": runner.name,
        "tokens": ids,
        "pieces": readable_pieces(tokenizer, ids),
        "count": len(ids),
        "max_model_len": runner.loaded.context_length,
    }


@bp.post("/detokenize")
@bp.arguments(DetokenizeSchema, example={"tokens": [19556, 905]})
@bp.response(200, DetokenizeResponseSchema)
@bp.errors(*READS_MODEL)
def detokenize(body: dict[str, Any]) -> dict[str, Any]:
    """Turn token ids back into text, with each token's piece."""
    runner = current_engine(body.get("model")).runner
    tokenizer = runner.loaded.tokenizer
    if len(body["tokens"]) > runner.limits.max_prompt_tokens:
        cap = runner.limits.max_prompt_tokens
        raise ValidationError(f"at most {cap} token ids", "tokens")
    if any(token >= len(tokenizer) for token in body["tokens"]):
        raise ValidationError(f"token ids must be below {len(tokenizer)}", "tokens")
    return {
        "model": runner.name,
        "prompt": tokenizer.decode(body["tokens"]),
        "pieces": readable_pieces(tokenizer, body["tokens"]),
    }


@bp.get("/tokenizer_info")
@bp.arguments(ModelQuerySchema, location="query")
@bp.response(200, TokenizerInfoSchema)
@bp.errors(404, 503)
def get_tokenizer_info(query: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer's special tokens, chat template and lengths (what vLLM answers here).

    lm-evaluation-harness's remote tokenizer reads this, then tokenizes through /tokenize.
    """
    runner = current_engine(query.get("model")).runner
    tokenizer = runner.loaded.tokenizer
    return {
        "model": runner.name,
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": runner.loaded.context_length,
        "vocab_size": len(tokenizer),
    }
