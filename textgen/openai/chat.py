"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from flask import Response

from textgen.api.docs import Blueprint
from textgen.engine.events import Delta, Finished, TokenLogprob
from textgen.engine.results import ModelResult
from textgen.openai.protocol import ChatCompletionSchema, OpenAIRequest
from textgen.openai.responses import CHAT_EVENTS, ChatCompletionResponseSchema
from textgen.openai.serving import Reply, StreamParts, finish_reason, respond
from textgen.openai.tool_calls import respond_with_tools

bp = Blueprint("chat", __name__, description="OpenAI-compatible chat completions")

EXAMPLE = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 16,
    "temperature": 0,
}
STREAM_EXAMPLE = (
    'data: {"id": "chatcmpl-...", "object": "chat.completion.chunk", "created": 1764547200, '
    '"model": "smollm2-135m-instruct", "choices": [{"index": 0, "delta": {"content": "Paris"}, '
    '"logprobs": null, "finish_reason": null}]}\n\n'
    "data: [DONE]\n\n"
)


@bp.post("/v1/chat/completions")
@bp.arguments(ChatCompletionSchema, example=EXAMPLE)
@bp.response(200, ChatCompletionResponseSchema)
@bp.streams(CHAT_EVENTS, STREAM_EXAMPLE)
@bp.generates
def create_chat_completion(body: OpenAIRequest) -> Response | dict[str, Any]:
    """Answer a conversation through the model's chat template, whole or streamed.

    `response_format` `json_object` or `json_schema` constrains the output to valid JSON
    (schema-valid for the latter); `logprobs` and `top_logprobs`, `n`, `stop` and `seed` work
    as in OpenAI's API. With `tools`, the answer may be a call (`message.tool_calls`,
    `finish_reason: "tool_calls"`) whose arguments a grammar keeps to the function's schema.
    """
    if body.tool_mode != "none":
        return respond_with_tools(body)
    return respond(
        body,
        "chatcmpl",
        "chat.completion",
        "chat.completion.chunk",
        choice,
        stream_parts,
    )


def choice(reply: Reply, result: ModelResult, finished: Finished) -> dict[str, Any]:
    """One choice of a whole response."""
    return {
        "index": reply.index(finished),
        "message": {"role": "assistant", "content": finished.text},
        "logprobs": logprobs_block(reply, finished.logprobs),
        "finish_reason": finish_reason(finished),
    }


def logprobs_block(reply: Reply, entries: tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
    """The chat logprobs block: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if reply.body.params.logprobs is None:
        return None

    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = reply.text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {
        "content": [
            {
                **item(e.token, e.logprob),
                "top_logprobs": [item(token, logprob) for token, logprob in e.top],
            }
            for e in entries
        ]
    }


def stream_parts(reply: Reply) -> StreamParts:
    """Chunks: the role first (once per choice, as OpenAI sends it), content, then finishes."""
    base = reply.base("chat.completion.chunk")

    def chunk(index: int, delta: dict[str, Any], logprobs: Any, reason: str | None) -> dict:
        entry = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {**base, "choices": [entry]}

    opening = [
        chunk(index, {"role": "assistant", "content": ""}, None, None)
        for index in range(reply.body.params.num_return_sequences)
    ]

    def on_delta(model: str, event: Delta) -> dict[str, Any] | None:
        if not event.text and not event.logprobs:
            return None
        logprobs = logprobs_block(reply, event.logprobs)
        return chunk(reply.index(event), {"content": event.text}, logprobs, None)

    def on_finish(model: str, event: Finished) -> dict[str, Any]:
        return chunk(reply.index(event), {}, None, finish_reason(event))

    return StreamParts(opening, on_delta, on_finish)
