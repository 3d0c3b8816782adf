"""What the OpenAI endpoints share: submitting, usage, ids, and the stream's skeleton."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from textgen.api.streaming import DONE, follow, sse, sse_error
from textgen.engine.sequence import Delta, Failed, Finished, RequestHandle, TokenLogprob
from textgen.engine.submission import Submission
from textgen.models.registry import ModelRegistry
from textgen.openai.protocol import FINISH_REASONS, OpenAIRequest


def submit(registry: ModelRegistry, body: OpenAIRequest) -> Submission:
    """Check the request against its model, then queue it on the model's engine."""
    engine = registry.engine(body.model)
    job = engine.runner.prepare(body.prompts, body.params, body.until_context)
    return Submission.start([(engine, job)], body.timeout)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def choice_index(handle: RequestHandle, event: Delta | Finished) -> int:
    """OpenAI numbers choices across prompts: prompt i's j-th of n is i * n + j."""
    return event.prompt_index * handle.job.params.num_return_sequences + event.index


def finish_reason(event: Finished) -> str:
    return FINISH_REASONS.get(event.finish_reason, event.finish_reason)


def outputs(submission: Submission) -> list[Finished]:
    """The finished outputs in choice order."""
    return sorted(submission.finished.values(), key=lambda f: (f.prompt_index, f.index))


def usage(submission: Submission) -> dict[str, int]:
    handle = submission.handles[0]
    prompt = sum(len(ids) for ids in handle.job.encoded)
    completion = sum(f.completion_tokens for f in submission.finished.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def token_text(registry: ModelRegistry, model: str) -> Callable[[int], str]:
    """How a single token reads in logprobs.

    A token that is only part of a UTF-8 character decodes to U+FFFD, the same for many
    tokens; like OpenAI, such a token is shown as "bytes:" and its raw piece, so every
    token keeps a distinct key in top_logprobs.
    """
    tokenizer = registry.engine(model).runner.loaded.tokenizer

    def text(token: int) -> str:
        piece = str(tokenizer.decode([token]))
        if "\ufffd" in piece:
            return "bytes:" + str(tokenizer.convert_ids_to_tokens(token))
        return piece

    return text


def stream_chunks(
    submission: Submission,
    sock: socket.socket | None,
    ping_s: float,
    opening: Callable[[], Iterator[dict[str, Any]]],
    on_delta: Callable[[RequestHandle, Delta], dict[str, Any] | None],
    on_finish: Callable[[RequestHandle, Finished], dict[str, Any]],
    final_usage: dict[str, Any] | None,
) -> Iterator[str]:
    """The SSE skeleton both endpoints share: opening chunks, deltas, finishes, usage, [DONE]."""
    try:
        for chunk in opening():
            yield sse(chunk)
        for item in follow(submission, sock, ping_s):
            if isinstance(item, str):
                yield item
                continue
            handle, event = item
            if isinstance(event, Delta):
                delta = on_delta(handle, event)
                if delta is not None:
                    yield sse(delta)
            elif isinstance(event, Finished):
                yield sse(on_finish(handle, event))
            elif isinstance(event, Failed):
                yield sse_error(event.message)
                yield DONE
                return
        if not submission.done:
            return  # the client left
        if final_usage is not None:
            yield sse({**final_usage, "choices": [], "usage": usage(submission)})
        yield DONE
    finally:
        submission.cancel()


def chunk_base(response_id: str, object_: str, model: str) -> dict[str, Any]:
    return {"id": response_id, "object": object_, "created": int(time.time()), "model": model}


def top_entries(entry: TokenLogprob, text: Callable[[int], str]) -> list[tuple[str, float]]:
    return [(text(token), logprob) for token, logprob in entry.top]
