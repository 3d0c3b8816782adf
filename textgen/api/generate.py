"""POST /generate: one or more prompts on one or more models, whole or streamed."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Response, request

from textgen.api import current_registry
from textgen.api.docs import GENERATES, Blueprint
from textgen.api.responses import GENERATION_EVENTS, GenerationSchema
from textgen.api.schemas import GenerateRequest, GenerateSchema
from textgen.api.streaming import sse_response, stream_events, wait_for
from textgen.engine.events import Delta, Finished
from textgen.engine.request import RequestHandle
from textgen.engine.submission import Submission

bp = Blueprint("generate", __name__, description="Native generation: prompts x models x strategies")

EXAMPLE = {"prompt": "The capital of France is", "strategy": "greedy", "max_new_tokens": 8}
STREAM_EXAMPLE = (
    'data: {"model": "smollm2-135m-instruct", "prompt_index": 0, "index": 0, "text": " Paris"}'
    "\n\n"
    'data: {"model": "smollm2-135m-instruct", "prompt_index": 0, "index": 0, "text": "", '
    '"finish_reason": "length", "completion_tokens": 8}\n\n'
    'data: {"id": "gen-...", "object": "generation", "created": 1764547200, "usage": {...}, '
    '"results": [...]}\n\n'
    "data: [DONE]\n\n"
)


@bp.post("/generate")
@bp.arguments(GenerateSchema, example=EXAMPLE)
@bp.response(200, GenerationSchema)
@bp.streams(GENERATION_EVENTS, STREAM_EXAMPLE)
@bp.errors(*GENERATES)
def create_generation(body: GenerateRequest) -> Response | dict[str, Any]:
    """Generate text for each prompt with each model.

    One prompt or a batch (`prompt` as a list), or chat `messages`; one `model` or several
    (`models`: each gets the same prompts and settings, for comparison); a `strategy` (greedy,
    beam, sampling, top_k) and its knobs. With `"stream": true` the answer is server-sent
    events.
    """
    registry = current_registry()
    engines = [registry.engine(name) for name in body.models]
    submission = Submission.start(engines, body.prompts, body.params, body.timeout)
    sock = request.environ.get("gunicorn.socket")
    if body.stream:
        ping_s = registry.settings.stream_ping_s
        return sse_response(stream_generation(submission, sock, ping_s))
    return collect_generation(submission, sock)


def collect_generation(submission: Submission, sock: socket.socket | None) -> dict[str, Any]:
    """Wait for every output; an empty body if the client left meanwhile (nobody reads it)."""
    return response_body(submission) if wait_for(submission, sock) else {}


def stream_generation(
    submission: Submission, sock: socket.socket | None, ping_s: float
) -> Iterator[str]:
    """Server-sent events: text deltas, each output's finish, a summary, then [DONE]."""

    def on_delta(handle: RequestHandle, event: Delta) -> dict[str, Any] | None:
        return output_key(handle, event) | {"text": event.text} if event.text else None

    def on_finish(handle: RequestHandle, event: Finished) -> dict[str, Any]:
        return output_key(handle, event) | {
            "text": "",
            "finish_reason": event.finish_reason.value,
            "completion_tokens": event.completion_tokens,
        }

    def closing() -> dict[str, Any]:
        summary = response_body(submission)
        return {k: v for k, v in summary.items() if k != "results"} | summaries(summary)

    return stream_events(submission, sock, ping_s, on_delta, on_finish, closing)


def output_key(handle: RequestHandle, event: Delta | Finished) -> dict[str, Any]:
    return {"model": handle.model, "prompt_index": event.prompt_index, "index": event.index}


def summaries(body: dict[str, Any]) -> dict[str, Any]:
    """The per-model parts of a response without the texts (the stream already sent them)."""
    return {"results": [{k: v for k, v in r.items() if k != "outputs"} for r in body["results"]]}


def response_body(submission: Submission) -> dict[str, Any]:
    """The whole response, from the finished outputs."""
    results = [result_body(handle, submission) for handle in submission.handles]
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in results)
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in results)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
    return {
        "id": f"gen-{uuid.uuid4().hex}",
        "object": "generation",
        "created": int(time.time()),
        "results": results,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }


def result_body(handle: RequestHandle, submission: Submission) -> dict[str, Any]:
    """One model's part of the response."""
    outputs = sorted(
        (f for (model, _, _), f in submission.finished.items() if model == handle.model),
        key=lambda f: (f.prompt_index, f.index),
    )
    completion = sum(f.completion_tokens for f in outputs)
    return {
        "model": handle.model,
        "outputs": [
            {
                "prompt_index": f.prompt_index,
                "index": f.index,
                "text": f.text,
                "finish_reason": f.finish_reason.value,
                "completion_tokens": f.completion_tokens,
            }
            for f in outputs
        ],
        "parameters": handle.job.params.applied(),
        "usage": usage(
            sum(len(ids) for ids in handle.job.encoded),
            completion,
            sum(handle.cached_tokens.values()),
        ),
        "timings": timings(handle, completion),
    }


def timings(handle: RequestHandle, completion_tokens: int) -> dict[str, float | None]:
    """Where the time went, measured from the moment the engine accepted the request."""

    def since(start: float | None, end: float | None) -> float | None:
        return round(end - start, 6) if start is not None and end is not None else None

    generation = since(handle.admitted, handle.finished)
    return {
        "queue_s": since(handle.created, handle.admitted),
        "time_to_first_token_s": since(handle.created, handle.first_token),
        "generation_s": generation,
        "tokens_per_second": round(completion_tokens / generation, 3) if generation else None,
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """Token counts in the OpenAI shape; ``cached_tokens``: prompt tokens continued from the
    prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
