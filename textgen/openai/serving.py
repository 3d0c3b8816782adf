"""What the OpenAI endpoints share: one request-to-response path, usage, ids, token texts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from flask import Response, request

from textgen.api import current_engine, current_registry, submit
from textgen.api.responses import usage_body
from textgen.api.streaming import sse_response, stream_events, wait_for
from textgen.engine.events import Delta, Finished, TokenLogprob
from textgen.engine.results import ModelResult, Usage
from textgen.engine.scheduler import Engine
from textgen.engine.submission import Submission
from textgen.openai.protocol import OpenAIRequest
from textgen.service.registry import ModelRegistry


@dataclass(frozen=True)
class Reply:
    """Everything one OpenAI response is built from."""

    registry: ModelRegistry
    body: OpenAIRequest
    submission: Submission
    model: str
    text: Callable[[int], str]  # how a token reads in logprobs
    response_id: str
    fingerprint: str

    def base(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": object_name,
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def index(self, event: Delta | Finished) -> int:
        """OpenAI numbers choices across prompts: prompt i's j-th of n is i * n + j."""
        return event.prompt_index * self.body.params.num_return_sequences + event.index


@dataclass(frozen=True)
class StreamParts:
    """How an endpoint's stream looks: its first chunks, a delta's chunk, a finish's chunk."""

    opening: Iterable[dict[str, Any]]
    on_delta: Callable[[str, Delta], dict[str, Any] | None]
    on_finish: Callable[[str, Finished], dict[str, Any]]


def respond(
    body: OpenAIRequest,
    id_prefix: str,
    object_name: str,
    chunk_object: str,
    choice: Callable[[Reply, ModelResult, Finished], dict[str, Any]],
    stream_parts: Callable[[Reply], StreamParts],
) -> Response | dict[str, Any]:
    """Queue a validated request on the model's engine, then answer whole or as a stream."""
    registry = current_registry()
    engine = current_engine(body.model)
    submission = submit([engine], body.prompts, body.params, body.timeout, body.until_context)
    model = engine.name
    reply = Reply(
        registry,
        body,
        submission,
        model,
        token_text(registry, model),
        new_id(id_prefix),
        system_fingerprint(engine),
    )
    sock = request.environ.get("gunicorn.socket")
    if body.stream:
        parts = stream_parts(reply)

        def closing() -> dict[str, Any] | None:
            if not body.include_usage:
                return None
            usage = usage_body(reported(body, submission.result().usage))
            return {**reply.base(chunk_object), "choices": [], "usage": usage}

        ping_s = registry.settings.stream_ping_s
        return sse_response(
            stream_events(
                submission, sock, ping_s, parts.on_delta, parts.on_finish, closing, parts.opening
            )
        )
    if not wait_for(submission, sock):
        return {}  # the client left; nobody reads this
    result = submission.result().models[0]
    choices = [choice(reply, result, finished) for finished in result.outputs]
    usage = usage_body(reported(body, result.usage))
    return {**reply.base(object_name), "choices": choices, "usage": usage}


def reported(body: OpenAIRequest, usage: Usage) -> Usage:
    """The usage a client is told of: a score-only request generated nothing it sees."""
    return dataclasses.replace(usage, completion_tokens=0) if body.score_only else usage


def system_fingerprint(engine: Engine) -> str:
    """What OpenAI's system_fingerprint stands for: the backend configuration that, with the
    seed, decides the output (here the model, its revision and weight format, and textgen's
    version)."""
    loaded = engine.runner.loaded
    return fingerprint(loaded.spec.name, loaded.prepared.revision, loaded.spec.dtype)


@functools.cache
def fingerprint(name: str, revision: str | None, dtype: str) -> str:
    # Once per model: reading the package version touches the disk.
    key = f"{version('textgen')}:{name}:{revision}:{dtype}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(event: Finished) -> str:
    return event.finish_reason.openai


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


def top_entries(entry: TokenLogprob, text: Callable[[int], str]) -> list[tuple[str, float]]:
    return [(text(token), logprob) for token, logprob in entry.top]
