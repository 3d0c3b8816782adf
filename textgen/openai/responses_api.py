"""POST /v1/responses: OpenAI's Responses API, stateless, whole or as its typed events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Response, request

from textgen.api import current_engine, current_registry, submit
from textgen.api.docs import Blueprint
from textgen.api.streaming import follow, sse_response
from textgen.engine.events import Delta, Failed, Finished
from textgen.engine.results import Usage
from textgen.engine.submission import Submission
from textgen.generation.finish import FinishReason
from textgen.openai.protocol import OpenAIRequest
from textgen.openai.responses import RESPONSE_EVENTS, ResponseObjectSchema
from textgen.openai.responses_protocol import ResponsesSchema
from textgen.openai.tool_calls import Answer, answer_of, argument_pieces

bp = Blueprint("responses", __name__, description="OpenAI's Responses API (stateless)")

STREAM_EXAMPLE = (
    'event: response.created\ndata: {"type": "response.created", "sequence_number": 0, ...}\n\n'
    'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
    '"delta": " Paris", ...}\n\n'
    'event: response.completed\ndata: {"type": "response.completed", "response": {...}}\n\n'
)


@bp.post("/v1/responses")
@bp.arguments(
    ResponsesSchema,
    example={"input": "What is the capital of France?", "max_output_tokens": 16, "temperature": 0},
)
@bp.response(200, ResponseObjectSchema)
@bp.streams(RESPONSE_EVENTS, STREAM_EXAMPLE)
@bp.generates
def create_response(body: OpenAIRequest) -> Response | dict[str, Any]:
    """Answer an input (a string or message items) with optional instructions and tools.

    Stateless: `previous_response_id` is refused (send the whole conversation); `text.format`
    json_schema is enforced by grammar, and function calls are made valid the way chat
    completions make them.
    """
    registry = current_registry()
    engine = current_engine(body.model)
    sock = request.environ.get("gunicorn.socket")
    head = {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "model": engine.name,
        "error": None,
        "metadata": {},
        "parallel_tool_calls": False,
        **body.echoed_settings,
    }
    if body.stream and not body.tools:
        submission = submit([engine], body.prompts, body.params, body.timeout, body.until_context)
        ping_s = registry.settings.stream_ping_s
        return sse_response(stream_text(head, submission, sock, ping_s))
    answer = answer_of(engine, body, sock)
    if answer is None:
        return {}  # the client left; nobody reads this
    whole = {**head, **outcome(answer)}
    return sse_response(replay(head, whole)) if body.stream else whole


def outcome(answer: Answer) -> dict[str, Any]:
    """The output items, status and usage of a finished answer."""
    if answer.call is not None:
        item: dict[str, Any] = {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex}",
            "call_id": f"call_{uuid.uuid4().hex[:24]}",
            "name": answer.call.name,
            "arguments": json.dumps(answer.call.arguments, ensure_ascii=False),
            "status": "completed",
        }
        return {
            "status": "completed",
            "incomplete_details": None,
            "output": [item],
            "usage": usage(answer.usage),
        }
    return finished_text(answer.finished, answer.usage, f"msg_{uuid.uuid4().hex}")


def finished_text(finished: Finished, used: Usage, item_id: str) -> dict[str, Any]:
    cut = finished.finish_reason in (FinishReason.LENGTH, FinishReason.TIME_LIMIT)
    part = {"type": "output_text", "text": finished.text, "annotations": []}
    item = {
        "type": "message",
        "id": item_id,
        "status": "incomplete" if cut else "completed",
        "role": "assistant",
        "content": [part],
    }
    return {
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": [item],
        "usage": usage(used),
    }


def usage(used: Usage) -> dict[str, Any]:
    return {
        "input_tokens": used.prompt_tokens,
        "input_tokens_details": {"cached_tokens": used.cached_tokens},
        "output_tokens": used.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": used.total_tokens,
    }


class Events:
    """Typed server-sent events, numbered as the Responses API numbers them."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **payload: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def opening(event: Events, head: dict[str, Any]) -> Iterator[str]:
    started = {**head, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)


def stream_text(
    head: dict[str, Any], submission: Submission, sock: Any, ping_s: float
) -> Iterator[str]:
    """A text answer as it is generated: the item and its part opened, text deltas, then
    everything closed and the whole response."""
    event = Events()
    item_id = f"msg_{uuid.uuid4().hex}"
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    try:
        yield from opening(event, head)
        item = {
            "type": "message",
            "id": item_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        yield event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", **where, part=part)
        for entry in follow(submission, sock, ping_s):
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry[1], Delta) and entry[1].text:
                yield event("response.output_text.delta", **where, delta=entry[1].text)
            elif isinstance(entry[1], Failed):
                failed = entry[1]
                yield event("error", code=failed.code, message=failed.message, param=failed.param)
                return
        if not submission.done:
            return  # the client left
        result = submission.result().models[0]
        whole = {**head, **finished_text(result.outputs[0], result.usage, item_id)}
        yield from closing(event, whole)
    finally:
        submission.close()


def replay(head: dict[str, Any], whole: dict[str, Any]) -> Iterator[str]:
    """A finished answer (a call, or text made with tools offered) as the same events."""
    event = Events()
    yield from opening(event, head)
    item = whole["output"][0]
    if item["type"] == "function_call":
        yield event("response.output_item.added", output_index=0, item={**item, "arguments": ""})
        arguments = item["arguments"]
        for part in argument_pieces(arguments):
            yield event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=0,
                delta=part,
            )
        yield event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=0,
            arguments=arguments,
        )
        yield event("response.output_item.done", output_index=0, item=item)
        yield event("response.completed", response=whole)
        return
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    yield event("response.output_item.added", output_index=0, item={**item, "content": []})
    yield event(
        "response.content_part.added",
        **where,
        part={"type": "output_text", "text": "", "annotations": []},
    )
    text = item["content"][0]["text"]
    if text:
        yield event("response.output_text.delta", **where, delta=text)
    yield from closing(event, whole)


def closing(event: Events, whole: dict[str, Any]) -> Iterator[str]:
    """The text item's close-out events, then the whole response."""
    item = whole["output"][0]
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    yield event("response.output_text.done", **where, text=part["text"])
    yield event("response.content_part.done", **where, part=part)
    yield event("response.output_item.done", output_index=0, item=item)
    last = "response.completed" if whole["status"] == "completed" else "response.incomplete"
    yield event(last, response=whole)
