"""Request ids: X-Request-ID taken from the client (or the proxy) when sane, else made, and
sent back on every response."""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

HEADER = "X-Request-ID"
# What a proxy or client may choose: short, and nothing that could forge a header or a log line.
SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id() -> str:
    """This request's id (set before the view runs)."""
    return str(g.get("request_id") or "")


def init_request_ids(app: Flask) -> None:
    """Give every request an id and echo it in the response's X-Request-ID."""

    @app.before_request
    def take_request_id() -> None:
        given = request.headers.get(HEADER, "")
        g.request_id = given if SANE.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def echo_request_id(response: Response) -> Response:
        # Errors raised before take_request_id ran (a 404 routing miss does run it) get one too.
        response.headers[HEADER] = request_id() or uuid.uuid4().hex
        return response
