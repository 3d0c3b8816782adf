"""POST /v1/completions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from textgen.api.schemas import load_body
from textgen.api.streaming import sse_response, wait_for
from textgen.engine.sequence import Delta, Finished, RequestHandle, TokenLogprob
from textgen.engine.submission import Submission
from textgen.models.registry import ModelRegistry
from textgen.openai.protocol import CompletionSchema, OpenAIRequest
from textgen.openai.serving import (
    choice_index,
    chunk_base,
    finish_reason,
    new_id,
    outputs,
    stream_chunks,
    submit,
    token_text,
    top_entries,
    usage,
)

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
def create_completion() -> Response:
    """OpenAI text completion, whole or streamed."""
    registry: ModelRegistry = current_app.extensions["textgen.registry"]
    body: OpenAIRequest = load_body(CompletionSchema(registry.settings))
    submission = submit(registry, body)
    model = submission.handles[0].model
    text = token_text(registry, model)
    sock = request.environ.get("gunicorn.socket")
    response_id = new_id("cmpl")
    if body.stream:
        return sse_response(stream_completion(submission, sock, registry, body, response_id, text))
    if not wait_for(submission, sock):
        return jsonify({})
    handle = submission.handles[0]
    choices = [
        {
            "index": choice_index(handle, f),
            "text": (echoed(body, registry, handle, f.prompt_index) if body.echo else "") + f.text,
            "logprobs": completion_logprobs(handle, f.prompt_index, f.logprobs, body.echo, text),
            "finish_reason": finish_reason(f),
        }
        for f in outputs(submission)
    ]
    base = chunk_base(response_id, "text_completion", model)
    return jsonify({**base, "choices": choices, "usage": usage(submission)})


def echoed(
    body: OpenAIRequest, registry: ModelRegistry, handle: RequestHandle, prompt_index: int
) -> str:
    """The prompt for echo: as sent, or decoded when it was sent as token ids."""
    prompt = body.prompts[prompt_index]
    if prompt.text is not None:
        return prompt.text
    tokenizer = registry.engine(handle.model).runner.loaded.tokenizer
    return str(tokenizer.decode(handle.job.encoded[prompt_index]))


def completion_logprobs(
    handle: RequestHandle,
    prompt_index: int,
    generated: tuple[TokenLogprob, ...],
    echo: bool,
    text: Callable[[int], str],
    offset: int = 0,
) -> dict[str, Any] | None:
    """The completions logprobs block: tokens, token_logprobs, top_logprobs, text_offset."""
    if handle.job.params.logprobs is None:
        return None
    entries: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        prompt = handle.job.encoded[prompt_index]
        entries += list(zip(prompt, handle.prompt_logprobs.get(prompt_index, []), strict=False))
    entries += [(e.token, e) for e in generated]
    block: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token, entry in entries:
        piece = text(token)
        block["tokens"].append(piece)
        block["token_logprobs"].append(entry.logprob if entry else None)
        block["top_logprobs"].append(dict(top_entries(entry, text)) if entry else None)
        block["text_offset"].append(offset)
        offset += len(piece)
    return block


def stream_completion(
    submission: Submission,
    sock: Any,
    registry: ModelRegistry,
    body: OpenAIRequest,
    response_id: str,
    text: Callable[[int], str],
) -> Iterator[str]:
    handle = submission.handles[0]
    base = chunk_base(response_id, "text_completion", handle.model)
    offsets: dict[int, int] = {}

    def choice(index: int, piece: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        entry = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason}
        return {**base, "choices": [entry]}

    def opening() -> Iterator[dict[str, Any]]:
        if not body.echo:
            return
        n = body.params.num_return_sequences
        for prompt_index in range(len(handle.job.encoded)):
            prompt = echoed(body, registry, handle, prompt_index)
            for index in range(n):
                # The prompt's own logprobs are not known yet (no prefill has run), so a
                # stream echoes its text only.
                offsets[prompt_index * n + index] = len(prompt)
                yield choice(prompt_index * n + index, prompt, None, None)

    def on_delta(owner: RequestHandle, event: Delta) -> dict[str, Any] | None:
        if not event.text and not event.logprobs:
            return None
        index = choice_index(owner, event)
        logprobs = completion_logprobs(
            owner, event.prompt_index, event.logprobs, False, text, offsets.get(index, 0)
        )
        offsets[index] = offsets.get(index, 0) + len(event.text)
        return choice(index, event.text, logprobs, None)

    def on_finish(owner: RequestHandle, event: Finished) -> dict[str, Any]:
        return choice(choice_index(owner, event), "", None, finish_reason(event))

    final = base if body.include_usage else None
    ping_s = registry.settings.stream_ping_s
    yield from stream_chunks(submission, sock, ping_s, opening, on_delta, on_finish, final)
