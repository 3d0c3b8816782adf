"""Chat completions with tools: a call made valid by grammar, answered whole or as chunks."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Response, request

from textgen.api import current_engine, submit
from textgen.api.responses import usage_body
from textgen.api.streaming import DONE, sse, sse_response, wait_for
from textgen.engine.events import Finished
from textgen.engine.results import ModelResult, Usage
from textgen.engine.scheduler import Engine
from textgen.generation.tools import ToolCall, call_schema, parse_call, starts_call
from textgen.openai.protocol import OpenAIRequest, grammar_spec
from textgen.openai.serving import new_id, system_fingerprint

# How many pieces a streamed call's arguments come in (OpenAI streams them in many).
ARGUMENT_PIECES = 4


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the model said: a call, or text; and what producing it cost."""

    call: ToolCall | None
    finished: Finished
    usage: Usage


def respond_with_tools(body: OpenAIRequest) -> Response | dict[str, Any]:
    """Generate (again under the grammar of a call when an "auto" answer starts one), then
    answer in OpenAI's shape: message.tool_calls and finish_reason "tool_calls" for a call."""
    engine = current_engine(body.model)
    sock = request.environ.get("gunicorn.socket")
    answer = answer_of(engine, body, sock)
    if answer is None:
        return {}  # the client left; nobody reads this
    base = {
        "id": new_id("chatcmpl"),
        "created": int(time.time()),
        "model": engine.name,
        "system_fingerprint": system_fingerprint(engine),
    }
    if body.stream:
        return sse_response(chunks(base, answer, body.include_usage))
    message: dict[str, Any] = {"role": "assistant", "content": answer.finished.text}
    if answer.call is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [call_object(answer.call)]}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason(answer)}
    return {
        **base,
        "object": "chat.completion",
        "choices": [choice],
        "usage": usage_body(answer.usage),
    }


def answer_of(engine: Engine, body: OpenAIRequest, sock: socket.socket | None) -> Answer | None:
    """The model's answer, or None if the client left."""
    first = generate(engine, body, sock)
    if first is None:
        return None
    finished = first.outputs[0]
    if body.tool_mode in ("required", "function"):
        return Answer(parse_call(finished.text, body.tools), finished, first.usage)
    if not body.tools or not starts_call(finished.text):
        return Answer(None, finished, first.usage)
    # The model began a call on its own: it is made again under the grammar of a call to one
    # of the tools, so that its arguments follow the function's schema. Both runs are counted.
    spec = grammar_spec("json_schema", call_schema(body.tools))
    params = dataclasses.replace(body.params, response_format=spec)
    second = generate(engine, dataclasses.replace(body, params=params), sock)
    if second is None:
        return None
    redone = second.outputs[0]
    return Answer(parse_call(redone.text, body.tools), redone, first.usage + second.usage)


def generate(engine: Engine, body: OpenAIRequest, sock: socket.socket | None) -> ModelResult | None:
    submission = submit([engine], body.prompts, body.params, body.timeout, body.until_context)
    if not wait_for(submission, sock):
        return None
    return submission.result().models[0]


def call_object(call: ToolCall) -> dict[str, Any]:
    """A call in OpenAI's shape: an id, and the arguments as JSON text."""
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    function = {"name": call.name, "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def argument_pieces(arguments: str) -> list[str]:
    """A call's arguments cut into ARGUMENT_PIECES pieces, as a stream sends them."""
    size = max(1, -(-len(arguments) // ARGUMENT_PIECES))
    return [arguments[start : start + size] for start in range(0, len(arguments), size)]


def reason(answer: Answer) -> str:
    return "tool_calls" if answer.call is not None else answer.finished.finish_reason.openai


def chunks(base: dict[str, Any], answer: Answer, include_usage: bool) -> Iterator[str]:
    """The answer as OpenAI streams it: the role, the call (its name, then its arguments in
    pieces) or the text, the finish, the usage if asked, then [DONE]."""
    head = {**base, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": None if answer.call else ""})
    if answer.call is not None:
        call = call_object(answer.call)
        opening = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        yield chunk({"tool_calls": [{"index": 0, **opening}]})
        for part in argument_pieces(call["function"]["arguments"]):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
    elif answer.finished.text:
        yield chunk({"content": answer.finished.text})
    yield chunk({}, reason(answer))
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage_body(answer.usage)})
    yield DONE
