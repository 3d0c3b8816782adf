"""POST /v1/completions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Response

from textgen.api.docs import Blueprint
from textgen.engine.events import Delta, Finished, TokenLogprob
from textgen.engine.results import ModelResult
from textgen.openai.protocol import CompletionSchema, OpenAIRequest
from textgen.openai.responses import COMPLETION_EVENTS, CompletionResponseSchema
from textgen.openai.serving import Reply, StreamParts, finish_reason, respond, top_entries

bp = Blueprint("completions", __name__, description="OpenAI-compatible text completions")

STREAM_EXAMPLE = (
    'data: {"id": "cmpl-...", "object": "text_completion", "created": 1764547200, '
    '"model": "smollm2-135m-instruct", "choices": [{"index": 0, "text": " Paris", '
    '"logprobs": null, "finish_reason": null}]}\n\n'
    "data: [DONE]\n\n"
)


@bp.post("/v1/completions")
@bp.arguments(
    CompletionSchema,
    example={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
)
@bp.response(200, CompletionResponseSchema)
@bp.streams(COMPLETION_EVENTS, STREAM_EXAMPLE)
@bp.generates
def create_completion(body: OpenAIRequest) -> Response | dict[str, Any]:
    """Complete a prompt (OpenAI's legacy completions API), whole or streamed.

    `prompt` is a string, a list of strings, token ids or a list of those; `temperature` 0 is
    greedy decoding, anything else samples; `logprobs`, `echo`, `n`, `stop` and `seed` work as
    in OpenAI's API.
    """
    return respond(body, "cmpl", "text_completion", "text_completion", choice, stream_parts)


def choice(reply: Reply, result: ModelResult, finished: Finished) -> dict[str, Any]:
    """One choice of a whole response."""
    echo = reply.body.echo
    prompt_logprobs = result.prompt_logprobs.get(finished.prompt_index, ()) if echo else ()
    score_only = reply.body.score_only
    generated = "" if score_only else finished.text
    return {
        "index": reply.index(finished),
        "text": (echoed(reply, finished.prompt_index) if echo else "") + generated,
        "logprobs": logprobs_block(
            reply,
            finished.prompt_index,
            () if score_only else finished.logprobs,
            echo,
            prompt_logprobs=prompt_logprobs,
        ),
        "finish_reason": "length" if score_only else finish_reason(finished),
    }


def echoed(reply: Reply, prompt_index: int) -> str:
    """The prompt for echo: as sent, or decoded when it was sent as token ids."""
    prompt = reply.body.prompts[prompt_index]
    if prompt.text is not None:
        return prompt.text
    tokenizer = reply.registry.engine(reply.model).runner.loaded.tokenizer
    return str(tokenizer.decode(reply.submission.prompt_ids[reply.model][prompt_index]))


def logprobs_block(
    reply: Reply,
    prompt_index: int,
    generated: tuple[TokenLogprob, ...],
    echo: bool,
    offset: int = 0,
    prompt_logprobs: tuple[TokenLogprob | None, ...] = (),
) -> dict[str, Any] | None:
    """The completions logprobs block: tokens, token_logprobs, top_logprobs, text_offset."""
    if reply.body.params.logprobs is None:
        return None
    entries: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        prompt = reply.submission.prompt_ids[reply.model][prompt_index]
        entries += list(zip(prompt, prompt_logprobs, strict=False))
    entries += [(e.token, e) for e in generated]
    block: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token, entry in entries:
        piece = reply.text(token)
        block["tokens"].append(piece)
        block["token_logprobs"].append(entry.logprob if entry else None)
        block["top_logprobs"].append(dict(top_entries(entry, reply.text)) if entry else None)
        block["text_offset"].append(offset)
        offset += len(piece)
    return block


def stream_parts(reply: Reply) -> StreamParts:
    """Chunks: the echoed prompts first (when asked), then text deltas, then finishes."""
    base = reply.base("text_completion")
    offsets: dict[int, int] = {}

    def chunk(index: int, piece: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        entry = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason}
        return {**base, "choices": [entry]}

    def opening() -> Iterator[dict[str, Any]]:
        if not reply.body.echo:
            return
        n = reply.body.params.num_return_sequences
        for prompt_index in range(len(reply.submission.prompt_ids[reply.model])):
            prompt = echoed(reply, prompt_index)
            for index in range(prompt_index * n, prompt_index * n + n):
                # The prompt's own logprobs are not known yet (no prefill has run), so a
                # stream echoes its text only.
                offsets[index] = len(prompt)
                yield chunk(index, prompt, None, None)

    def on_delta(model: str, event: Delta) -> dict[str, Any] | None:
        if reply.body.score_only or (not event.text and not event.logprobs):
            return None
        index = reply.index(event)
        start = offsets.get(index, 0)
        logprobs = logprobs_block(reply, event.prompt_index, event.logprobs, False, start)
        offsets[index] = start + len(event.text)
        return chunk(index, event.text, logprobs, None)

    def on_finish(model: str, event: Finished) -> dict[str, Any]:
        reason = "length" if reply.body.score_only else finish_reason(event)
        return chunk(reply.index(event), "", None, reason)

    return StreamParts(opening(), on_delta, on_finish)
