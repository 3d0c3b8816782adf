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
from textgen.api.docs import Blueprint
from textgen.api.responses import GENERATION_EVENTS, GenerationSchema, usage_body
from textgen.api.schemas import GenerateRequest, GenerateSchema
from textgen.api.streaming import sse_response, stream_events, wait_for
from textgen.engine.events import Delta, Finished
from textgen.engine.results import ModelResult, Result
from textgen.engine.submission import Submission
from textgen.generation.postprocess import TextFilter, processed

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
@bp.generates
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
        return sse_response(stream_generation(body, submission, sock, ping_s))
    return collect_generation(body, submission, sock)


def collect_generation(
    body: GenerateRequest, submission: Submission, sock: socket.socket | None
) -> dict[str, Any]:
    """Wait for every output; an empty body if the client left meanwhile (nobody reads it)."""
    if not wait_for(submission, sock):
        return {}
    return response_body(submission.result(), body)


class Filters:
    """Each streamed output's post-processing (none when the request asked for none)."""

    def __init__(self, body: GenerateRequest) -> None:
        self.body = body
        self.filters: dict[tuple[str, int, int], TextFilter] = {}

    def of(self, model: str, prompt_index: int, index: int) -> TextFilter | None:
        if not self.body.postprocess.active:
            return None
        key = (model, prompt_index, index)
        if key not in self.filters:
            prompt = self.body.prompt_text(prompt_index)
            self.filters[key] = TextFilter(self.body.postprocess, prompt)
        return self.filters[key]


def stream_generation(
    body: GenerateRequest, submission: Submission, sock: socket.socket | None, ping_s: float
) -> Iterator[str]:
    """Server-sent events: text deltas, each output's finish, a summary, then [DONE]."""
    filters = Filters(body)

    def on_delta(model: str, event: Delta) -> dict[str, Any] | None:
        flt = filters.of(model, event.prompt_index, event.index)
        text = flt.push(event.text) if flt is not None else event.text
        return output_key(model, event) | {"text": text} if text else None

    def on_finish(model: str, event: Finished) -> dict[str, Any]:
        flt = filters.of(model, event.prompt_index, event.index)
        end: dict[str, Any] = {"text": flt.finish() if flt is not None else ""}
        if flt is not None and flt.changed:
            end["postprocessed"] = flt.changed
        return (
            output_key(model, event)
            | end
            | {
                "finish_reason": event.finish_reason.value,
                "completion_tokens": event.completion_tokens,
            }
        )

    def closing() -> dict[str, Any]:
        # The texts went out as deltas: the summary has the rest, its results last.
        summary = response_body(submission.result(), body, outputs=False)
        return {k: v for k, v in summary.items() if k != "results"} | {
            "results": summary["results"]
        }

    return stream_events(submission, sock, ping_s, on_delta, on_finish, closing)


def output_key(model: str, event: Delta | Finished) -> dict[str, Any]:
    return {"model": model, "prompt_index": event.prompt_index, "index": event.index}


def response_body(result: Result, request: GenerateRequest, outputs: bool = True) -> dict[str, Any]:
    """The whole response (GenerationSchema), from the frozen results (without the outputs
    for a stream's summary)."""
    body: dict[str, Any] = {
        "id": f"gen-{uuid.uuid4().hex}",
        "object": "generation",
        "created": int(time.time()),
        "results": [result_body(model, request, outputs) for model in result.models],
        "usage": usage_body(result.usage),
    }
    if request.preset is not None:
        body["preset"] = request.preset
    return body


def output_body(output: Finished, request: GenerateRequest) -> dict[str, Any]:
    text, changed = output.text, list[str]()
    if request.postprocess.active:
        prompt = request.prompt_text(output.prompt_index)
        text, changed = processed(request.postprocess, prompt, output.text)
    body = {
        "prompt_index": output.prompt_index,
        "index": output.index,
        "text": text,
        "finish_reason": output.finish_reason.value,
        "completion_tokens": output.completion_tokens,
    }
    if changed:
        body["postprocessed"] = changed
    return body


def result_body(result: ModelResult, request: GenerateRequest, outputs: bool) -> dict[str, Any]:
    """One model's part of the response."""
    part: dict[str, Any] = {"model": result.model}
    if outputs:
        part["outputs"] = [output_body(f, request) for f in result.outputs]
    return part | {
        "parameters": dict(result.parameters),
        "usage": usage_body(result.usage),
        "timings": dataclasses.asdict(result.timings),
    }
