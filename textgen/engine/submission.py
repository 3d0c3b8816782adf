"""A request as the HTTP layer sees it: jobs on one or more engines, and their merged events."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

from textgen.engine.events import Event, Failed, Finished
from textgen.engine.request import RequestHandle
from textgen.engine.scheduler import Engine
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import GenerationParams

# How long past its deadline a request is waited for: the engine ends it at the deadline, but a
# step (or a chunk of a prefill) that is running then finishes first.
DEADLINE_GRACE_S = 30.0


class Submission:
    """Jobs submitted together (one per model), read through a single event queue."""

    def __init__(
        self, handles: list[RequestHandle], events: queue.Queue[Any], deadline: float
    ) -> None:
        self.handles = handles
        self._events = events
        self.deadline = deadline
        self.finished: dict[tuple[str, int, int], Finished] = {}
        self.expected = sum(h.outputs for h in handles)

    @classmethod
    def start(
        cls,
        engines: list[Engine],
        prompts: list[PromptInput],
        params: GenerationParams,
        deadline_s: float,
        until_context: bool = False,
    ) -> Submission:
        """Run a request on every engine's model, all or nothing.

        The request is checked against every model before any generates (a prompt too long
        for one model fails the whole request at once), and if one engine is full, the jobs
        already queued on the others are withdrawn.
        """
        for engine in engines:
            engine.check_room()  # before the tokenizer runs
        jobs = [(e, e.runner.prepare(prompts, params, until_context)) for e in engines]
        events: queue.Queue[Any] = queue.Queue()
        deadline = time.perf_counter() + deadline_s
        handles: list[RequestHandle] = []
        try:
            for engine, job in jobs:
                handles.append(engine.submit(job, events, deadline))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return cls(handles, events, deadline)

    def cancel(self) -> None:
        """Withdraw every job (no-op for finished ones)."""
        for handle in self.handles:
            handle.cancel()

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.expected

    def events(self, poll: float) -> Iterator[tuple[RequestHandle, Event] | None]:
        """Events until every output finished or one failed; None after ``poll`` idle seconds.

        However the engine behaves, this ends: a request not done well past its deadline
        ends with a Failed event.
        """
        while not self.done:
            if time.perf_counter() > self.deadline + DEADLINE_GRACE_S:
                yield (
                    self.handles[0],
                    Failed("the request did not finish by its deadline", code="deadline_exceeded"),
                )
                return
            try:
                handle, event = self._events.get(timeout=poll)
            except queue.Empty:
                yield None
                continue
            if isinstance(event, Finished):
                self.finished[(handle.model, event.prompt_index, event.index)] = event
            yield handle, event
            if isinstance(event, Failed):
                return
