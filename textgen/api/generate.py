"""POST /generate: one or more prompts on one or more models, whole or streamed."""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Response, request

from textgen.api import current_engine, current_registry, submit
from textgen.api.docs import GENERATES, Blueprint
from textgen.api.responses import GENERATION_EVENTS, GenerationSchema, usage_body
from textgen.api.schemas import GenerateRequest, GenerateSchema
from textgen.api.streaming import sse_response, stream_events, wait_for
from textgen.engine.events import Delta, Finished
from textgen.engine.results import ModelResult, Result
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
    engines = [current_engine(name) for name in body.models]
    submission = submit(engines, body.prompts, body.params, body.timeout)
    sock = request.environ.get("gunicorn.socket")
    if body.stream:
        ping_s = registry.settings.stream_ping_s
        return sse_response(stream_generation(submission, sock, ping_s))
    return collect_generation(submission, sock)


def collect_generation(submission: Submission, sock: socket.socket | None) -> dict[str, Any]:
    """Wait for every output; an empty body if the client left meanwhile (nobody reads it)."""
    return response_body(submission.result()) if wait_for(submission, sock) else {}


def stream_generation(
    submission: Submission, sock: socket.socket | None, ping_s: float
) -> Iterator[str]:
    """Server-sent events: text deltas, each output's finish, a summary, then [DONE]."""

    def on_delta(model: str, event: Delta) -> dict[str, Any] | None:
        return output_key(model, event) | {"text": event.text} if event.text else None

    def on_finish(model: str, event: Finished) -> dict[str, Any]:
        return output_key(model, event) | {
            "text": "",
            "finish_reason": event.finish_reason.value,
            "completion_tokens": event.completion_tokens,
        }

    def closing() -> dict[str, Any]:
        summary = response_body(submission.result())
        return {k: v for k, v in summary.items() if k != "results"} | summaries(summary)

    return stream_events(submission, sock, ping_s, on_delta, on_finish, closing)


def output_key(model: str, event: Delta | Finished) -> dict[str, Any]:
    return {"model": model, "prompt_index": event.prompt_index, "index": event.index}


def summaries(body: dict[str, Any]) -> dict[str, Any]:
    """The per-model parts of a response without the texts (the stream already sent them)."""
    return {"results": [{k: v for k, v in r.items() if k != "outputs"} for r in body["results"]]}


def response_body(result: Result) -> dict[str, Any]:
    """The whole response (GenerationSchema), from the frozen results."""
    return {
        "id": f"gen-{uuid.uuid4().hex}",
        "object": "generation",
        "created": int(time.time()),
        "results": [result_body(model) for model in result.models],
        "usage": usage_body(result.usage),
    }


def result_body(result: ModelResult) -> dict[str, Any]:
    """One model's part of the response."""
    return {
        "model": result.model,
        "outputs": [
            {
                "prompt_index": f.prompt_index,
                "index": f.index,
                "text": f.text,
                "finish_reason": f.finish_reason.value,
                "completion_tokens": f.completion_tokens,
            }
            for f in result.outputs
        ],
        "parameters": dict(result.parameters),
        "usage": usage_body(result.usage),
        "timings": dataclasses.asdict(result.timings),
    }
