"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from textgen.api.schemas import load_body
from textgen.api.streaming import sse_response, wait_for
from textgen.engine.sequence import Delta, Finished, RequestHandle, TokenLogprob
from textgen.engine.submission import Submission
from textgen.models.registry import ModelRegistry
from textgen.openai.protocol import ChatCompletionSchema, OpenAIRequest
from textgen.openai.serving import (
    choice_index,
    chunk_base,
    finish_reason,
    new_id,
    outputs,
    stream_chunks,
    submit,
    token_text,
    usage,
)

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def create_chat_completion() -> Response:
    """OpenAI chat completion through the model's chat template, whole or streamed."""
    registry: ModelRegistry = current_app.extensions["textgen.registry"]
    body: OpenAIRequest = load_body(ChatCompletionSchema(registry.settings))
    submission = submit(registry, body)
    model = submission.handles[0].model
    text = token_text(registry, model)
    sock = request.environ.get("gunicorn.socket")
    response_id = new_id("chatcmpl")
    if body.stream:
        return sse_response(stream_chat(submission, sock, registry, body, response_id, text))
    if not wait_for(submission, sock):
        return jsonify({})
    handle = submission.handles[0]
    choices = [
        {
            "index": choice_index(handle, f),
            "message": {"role": "assistant", "content": f.text},
            "logprobs": chat_logprobs(handle, f.logprobs, text),
            "finish_reason": finish_reason(f),
        }
        for f in outputs(submission)
    ]
    base = chunk_base(response_id, "chat.completion", model)
    return jsonify({**base, "choices": choices, "usage": usage(submission)})


def chat_logprobs(
    handle: RequestHandle, entries: tuple[TokenLogprob, ...], text: Callable[[int], str]
) -> dict[str, Any] | None:
    """The chat logprobs block: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if handle.job.params.logprobs is None:
        return None

    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = text(token)
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


def stream_chat(
    submission: Submission,
    sock: Any,
    registry: ModelRegistry,
    body: OpenAIRequest,
    response_id: str,
    text: Callable[[int], str],
) -> Iterator[str]:
    handle = submission.handles[0]
    base = chunk_base(response_id, "chat.completion.chunk", handle.model)

    def choice(index: int, delta: dict[str, Any], logprobs: Any, reason: str | None) -> dict:
        entry = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {**base, "choices": [entry]}

    def opening() -> Iterator[dict[str, Any]]:
        # The role comes first, once per choice, as OpenAI sends it.
        for index in range(body.params.num_return_sequences):
            yield choice(index, {"role": "assistant", "content": ""}, None, None)

    def on_delta(owner: RequestHandle, event: Delta) -> dict[str, Any] | None:
        if not event.text and not event.logprobs:
            return None
        logprobs = chat_logprobs(owner, event.logprobs, text)
        return choice(choice_index(owner, event), {"content": event.text}, logprobs, None)

    def on_finish(owner: RequestHandle, event: Finished) -> dict[str, Any]:
        return choice(choice_index(owner, event), {}, None, finish_reason(event))

    final = base if body.include_usage else None
    ping_s = registry.settings.stream_ping_s
    yield from stream_chunks(submission, sock, ping_s, opening, on_delta, on_finish, final)
