"""A request as one engine holds it: its work still to admit, its rows, its events."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textgen.engine.events import Event, Failed, Finished, TokenLogprob
from textgen.engine.runner import Job
from textgen.errors import RequestRejected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """Rows that must join the batch together: one output, or the beams of one prompt."""

    prompt_index: int
    index: int  # the output's index (0 for a prompt's beams)
    rows: int


class RequestHandle:
    """What a request handler holds: the events its outputs produce, and a way to cancel.

    The engine thread owns the counters; handler threads only read ``events``, and call
    ``cancel``.
    """

    def __init__(self, model: str, job: Job, events: queue.Queue[Any], deadline: float) -> None:
        self.id = uuid.uuid4().hex
        self.model = model
        self.job = job
        self.events = events
        self.deadline = deadline
        self.created = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        params = job.params
        self.outputs = len(job.encoded) * params.num_return_sequences
        beams = params.num_beams > 1
        self.pending: deque[Unit] = deque(
            Unit(prompt_index, 0, params.num_beams) if beams else Unit(prompt_index, index, 1)
            for prompt_index in range(len(job.encoded))
            for index in range(1 if beams else params.num_return_sequences)
        )
        self.rows = sum(unit.rows for unit in self.pending)
        self.done = 0  # outputs finished
        self.live_rows = 0  # rows in a prefill or in the batch
        self.generated = 0  # tokens generated over all rows
        self.failed = False
        # prompt index -> how many of its tokens were continued from the prefix cache.
        self.cached_tokens: dict[int, int] = {}
        # prompt index -> logprob of each prompt token (None for the first), when asked.
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.on_complete: Callable[[RequestHandle], object] | None = None
        self._cancelled = threading.Event()

    @property
    def tokens_budget(self) -> int:
        """Tokens its rows may generate in all (each beam is a row)."""
        return self.job.tokens_budget

    def cancel(self) -> None:
        """The client left: the engine drops this request at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def abandoned(self) -> bool:
        """Failed, or cancelled before it completed: its rows only wait to be dropped.
        (A handler cancels a completed request too, on its way out.)"""
        return self.failed or (self.cancelled and not self.complete)

    @property
    def complete(self) -> bool:
        return self.done >= self.outputs

    @property
    def settled(self) -> bool:
        """Nothing of it is left in the engine: every output finished, or it was abandoned
        and its last row has gone."""
        return self.complete or (self.abandoned and self.live_rows == 0)

    def post(self, event: Event) -> None:
        """Send an event to the handler; the last output's Finished also ends the request."""
        if self.failed:
            return  # after a Failed event nobody reads more
        if isinstance(event, Failed):
            self.failed = True
            self.pending.clear()
        elif isinstance(event, Finished):
            self.done += 1
            if self.complete:
                self.finished = time.perf_counter()
                # Before the event: once the handler has it, the client may send its next
                # request, and this one's capacity must already be free.
                if self.on_complete is not None:
                    self.on_complete(self)
        self.events.put((self, event))

    def fail(
        self,
        message: str,
        client_error: bool = False,
        code: str = "generation_failed",
        param: str | None = None,
    ) -> None:
        """End the request with an error event (its rows are dropped at the next eviction)."""
        self.post(Failed(message, client_error, code, param))

    def fail_with(self, exc: Exception) -> None:
        """End the request after an error in its own work: a 400 when the request caused it."""
        if isinstance(exc, RequestRejected):
            self.fail(str(exc), True, exc.code or "invalid_request", exc.param)
            return
        log.error("request %s failed: %r", self.id, exc, exc_info=exc)
        self.fail(f"generation failed: {type(exc).__name__}")
