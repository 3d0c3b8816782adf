"""Every request observed once it ends (for a stream, once its last event is sent): one JSON
log line, and the HTTP metrics (textgen.service.prometheus); and GET /metrics."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request

from textgen.api.auth import principal
from textgen.api.docs import Blueprint
from textgen.api.tracing import request_id
from textgen.logs import FIELDS

if TYPE_CHECKING:
    from textgen.engine.submission import Submission

log = logging.getLogger("textgen.access")
bp = Blueprint("metrics", __name__, description="Prometheus metrics")

# Why a request was refused before it ran, by status (and, for 429, the error's code).
REASONS = {401: "unauthorised", 403: "forbidden", 413: "too_large", 415: "media_type"}


def watch(submission: Submission) -> None:
    """Note a request's submission (its model, tokens, timings go into its log line)."""
    g.setdefault("submissions", []).append(submission)


@bp.get("/metrics")
@bp.doc(responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
def metrics() -> Response:
    """Prometheus metrics of every worker: requests, latencies, tokens, queue and batch."""
    from textgen.service.prometheus import exposition

    body, content_type = exposition()
    return Response(body, content_type=content_type)


def outcome(submissions: list[Submission]) -> dict[str, Any]:
    """What the engine did for a request: models, tokens, first-token time, finish reasons."""
    if not submissions:
        return {}
    models, prompt, cached, completion, reasons = [], 0, 0, 0, []
    ttft: float | None = None
    for submission in submissions:
        result = submission.result()
        for model in result.models:
            models.append(model.model)
            prompt += model.usage.prompt_tokens
            cached += model.usage.cached_tokens
            completion += model.usage.completion_tokens
            reasons += [o.finish_reason.value for o in model.outputs]
            first = model.timings.time_to_first_token_s
            if first is not None and (ttft is None or first < ttft):
                ttft = first
    return {
        "model": ",".join(dict.fromkeys(models)),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "time_to_first_token_s": ttft,
        "finish_reason": ",".join(dict.fromkeys(reasons)) or None,
    }


def error_code(response: Response) -> str | None:
    if response.status_code < 400 or response.is_streamed or not response.is_json:
        return None
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


class Observer:
    """Writes the log lines and counts the metrics of finished requests on a thread of its
    own: a request thread only hands its line over. (Writing them on the request threads,
    each a syscall and a lock among dozens of streaming threads, tripled the time to first
    token at 16 clients: bench/RESULTS.md.)"""

    def __init__(self) -> None:
        self.lines: queue.SimpleQueue[tuple[dict[str, Any], list[Submission], str | None]] = (
            queue.SimpleQueue()
        )
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def put(self, line: dict[str, Any], submissions: list[Submission], reason: str | None) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():  # one per process (a fork)
                self.thread = threading.Thread(
                    target=self.run, name="textgen-observer", daemon=True
                )
                self.thread.start()
        self.lines.put((line, submissions, reason))

    def run(self) -> None:
        from textgen.service.prometheus import count_request

        while True:
            line, submissions, reason = self.lines.get()
            try:
                line.update(outcome(submissions))
                count_request(line, reason)
                message = f"{line['method']} {line['route']} {line['status']}"
                log.info("%s", message, extra={FIELDS: line})
            except Exception:  # one bad line must not end the observer
                log.exception("could not record a request")


OBSERVER = Observer()


def observe_refusal(
    app: Flask, method: str, path: str, status: int, client: str, code: str, duration_s: float
) -> None:
    """A request that textgen's gunicorn worker answered itself (server/worker.py: a full
    queue, every thread busy, a body too large or too slow): logged and counted as any other.
    Its route is the app's rule for the path, so that a client cannot make up metric labels."""
    try:
        rule, _ = app.url_map.bind("localhost").match(path, method, return_rule=True)
        route = rule.rule
    except Exception:  # not a route of the app, or not a path at all
        route = "(unmatched)"
    line: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "method": method if route != "(unmatched)" else "-",
        "route": route,
        "status": status,
        "client": client,
        "principal": None,
        "error": code,
        "duration_s": round(duration_s, 4),
    }
    OBSERVER.put(line, [], code if status == 429 else REASONS.get(status))


def init_observe(app: Flask, log_prompts: bool) -> None:
    """Log and count every request when its response is closed (and those the worker refuses
    itself, through ``app.extensions["textgen.refused"]``)."""
    app.extensions["textgen.refused"] = partial(observe_refusal, app)

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        started = g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        who = principal()
        line: dict[str, Any] = {
            "request_id": request_id(),
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "client": request.remote_addr,
            "principal": who.ident if who is not None else None,
        }
        code = error_code(response)
        if code is not None:
            line["error"] = code
        if log_prompts:
            body = request.get_json(silent=True)
            if isinstance(body, dict):
                line["prompt"] = body.get("prompt") or body.get("messages") or body.get("input")
        submissions = list(g.get("submissions", []))

        def close() -> None:
            line["duration_s"] = round(time.perf_counter() - started, 4)
            reason = REASONS.get(line["status"])
            if line["status"] == 429:
                reason = code or "rate_limited"
            OBSERVER.put(line, submissions, reason)

        response.call_on_close(close)
        return response
