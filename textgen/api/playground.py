"""GET /: the browser playground (textgen/static/playground/), served by textgen itself, with a
policy that lets the page load and call nothing but this server."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app

PAGE = Path(__file__).resolve().parent.parent / "static" / "playground" / "index.html"
# Scripts and styles from textgen's own files only (no inline script), requests to this server
# only: a model's output rendered on the page can neither run nor send anything.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

bp = Blueprint("playground", __name__)


@bp.get("/")
def index() -> Response:
    """The playground page."""
    response = current_app.response_class(PAGE.read_bytes(), mimetype="text/html")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
