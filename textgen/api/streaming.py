"""Server-sent events, and noticing a client that has gone away."""

from __future__ import annotations

import json
import select
import socket
from typing import Any

from flask import Response

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx would otherwise buffer the stream until it ends.
    "X-Accel-Buffering": "no",
}
PING = ": ping\n\n"
DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One event carrying JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


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
