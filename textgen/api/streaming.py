"""Server-sent events, and noticing a client that has gone away."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response

from textgen.api.errors import APIError, GenerationFailed, InvalidRequest
from textgen.engine.events import Delta, Event, Failed, Finished
from textgen.engine.submission import Submission

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx would otherwise buffer the stream until it ends.
    "X-Accel-Buffering": "no",
}
PING = ": ping\n\n"
DONE = "data: [DONE]\n\n"
# How often a waiting handler looks at its client's socket.
POLL_S = 0.2


def sse(data: dict[str, Any]) -> str:
    """One event carrying JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(failed: Failed) -> str:
    """The event that reports a failure after a stream has started."""
    kind = "invalid_request_error" if failed.client_error else "server_error"
    error = {"message": failed.message, "type": kind, "param": failed.param, "code": failed.code}
    return sse({"error": error})


def failure(failed: Failed) -> APIError:
    """The error a whole (non-streamed) response gives for a failed request."""
    if failed.client_error:
        return InvalidRequest(failed.message, failed.param, failed.code)
    return GenerationFailed(failed.message, code=failed.code)


def sse_response(events: Any) -> Response:
    """A text/event-stream response over an iterator of event strings."""
    return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)


def client_gone(sock: socket.socket | None) -> bool:
    """Whether the client closed its connection (an orderly EOF or a reset).

    A readable socket that yields no bytes on a peek has been closed by the peer. Without
    a socket (a test client, another server) nothing is known, so False.
    """
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def follow(
    submission: Submission, sock: socket.socket | None, ping_s: float | None = None
) -> Iterator[tuple[str, Event] | str]:
    """A submission's events for a handler, with PING after ``ping_s`` quiet seconds.

    Ends when every output finished, one failed (the Failed event is yielded), or the client
    left; whatever ends it, unfinished work is cancelled. Events arrive every decode step, so
    the client's socket is looked at on a clock rather than when idle.
    """
    quiet_since = checked = time.monotonic()
    try:
        for item in submission.events(POLL_S):
            now = time.monotonic()
            if now - checked >= POLL_S:
                checked = now
                if client_gone(sock):
                    return
            if item is None:
                if ping_s is not None and now - quiet_since >= ping_s:
                    quiet_since = now
                    yield PING
                continue
            quiet_since = now
            yield item
    finally:
        submission.close()  # cancels unfinished work, charges what was generated


def wait_for(submission: Submission, sock: socket.socket | None) -> bool:
    """Wait until every output finished (True), or the client left (False)."""
    for item in follow(submission, sock):
        if not isinstance(item, str) and isinstance(item[1], Failed):
            raise failure(item[1])
    return submission.done


def stream_events(
    submission: Submission,
    sock: socket.socket | None,
    ping_s: float,
    on_delta: Callable[[str, Delta], dict[str, Any] | None],
    on_finish: Callable[[str, Finished], dict[str, Any]],
    closing: Callable[[], dict[str, Any] | None],
    opening: Iterable[dict[str, Any]] = (),
) -> Iterator[str]:
    """The SSE skeleton of every streaming endpoint.

    Opening chunks, a chunk per delta and per finished output, pings while quiet, a closing
    chunk (usage, summary) once everything finished, then [DONE]; an error after the start is
    an error event, then [DONE]. Work is cancelled however the stream ends, including when
    the server closes it because the client went away.
    """
    try:
        for chunk in opening:
            yield sse(chunk)
        for item in follow(submission, sock, ping_s):
            if isinstance(item, str):
                yield item
                continue
            model, event = item
            if isinstance(event, Delta):
                delta = on_delta(model, event)
                if delta is not None:
                    yield sse(delta)
            elif isinstance(event, Finished):
                yield sse(on_finish(model, event))
            elif isinstance(event, Failed):
                yield sse_error(event)
                yield DONE
                return
        if not submission.done:
            return  # the client left
        last = closing()
        if last is not None:
            yield sse(last)
        yield DONE
    finally:
        submission.close()
