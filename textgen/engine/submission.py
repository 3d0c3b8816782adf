"""A request as the HTTP layer sees it: jobs on one or more engines, and their merged events."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any, Protocol

from textgen.engine.events import Event, Failed, Finished
from textgen.engine.request import RequestHandle
from textgen.engine.results import ModelResult, Result, Timings, Usage, since
from textgen.engine.scheduler import Engine
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import GenerationParams

# How long past its deadline a request is waited for: the engine ends it at the deadline, but a
# step (or a chunk of a prefill) that is running then finishes first.
DEADLINE_GRACE_S = 30.0


class Budget(Protocol):
    """What a request may generate, as the HTTP layer meters it (a per-key token limit)."""

    def admit(self, tokens: int) -> None:
        """Refuse (raise) a request that may generate this many tokens, before it runs."""

    def charge(self, tokens: int) -> None:
        """Count the tokens a request generated, once it has ended."""


class Submission:
    """Jobs submitted together (one per model), read through a single event queue."""

    def __init__(
        self,
        handles: list[RequestHandle],
        events: queue.Queue[Any],
        deadline: float,
        budget: Budget | None = None,
    ) -> None:
        self.handles = handles
        self.budget = budget
        self._closed = False
        self._events = events
        self.deadline = deadline
        self.finished: dict[tuple[str, int, int], Finished] = {}
        self.expected = sum(h.outputs for h in handles)
        # Each model's prompts as token ids, fixed once the runner prepared them.
        self.prompt_ids = {h.model: tuple(tuple(ids) for ids in h.job.encoded) for h in handles}

    @classmethod
    def start(
        cls,
        engines: list[Engine],
        prompts: list[PromptInput],
        params: GenerationParams,
        deadline_s: float,
        until_context: bool = False,
        budget: Budget | None = None,
    ) -> Submission:
        """Run a request on every engine's model, all or nothing.

        The request is checked against every model before any generates (a prompt too long
        for one model fails the whole request at once), and if one engine is full, the jobs
        already queued on the others are withdrawn. A ``budget`` may refuse it once its token
        counts are known, before any job is queued; ``close`` charges it.
        """
        for engine in engines:
            engine.check_room()  # before the tokenizer runs
        jobs = [(e, e.runner.prepare(prompts, params, until_context)) for e in engines]
        if budget is not None:
            budget.admit(sum(job.tokens_budget for _, job in jobs))
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
        return cls(handles, events, deadline, budget)

    def cancel(self) -> None:
        """Withdraw every job (no-op for finished ones)."""
        for handle in self.handles:
            handle.cancel()

    def close(self) -> None:
        """The handler is done with it: withdraw what still runs, and charge the budget with
        the tokens generated (once, however often it is called)."""
        self.cancel()
        if self._closed:
            return
        self._closed = True
        if self.budget is not None:
            self.budget.charge(sum(handle.generated for handle in self.handles))

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.expected

    def result(self) -> Result:
        """The frozen results of every finished output (once done)."""
        return Result(tuple(self._model_result(handle) for handle in self.handles))

    def _model_result(self, handle: RequestHandle) -> ModelResult:
        # The engine thread wrote the handle's counters before posting the last Finished,
        # which this thread has read from the queue since.
        outputs = tuple(
            sorted(
                (f for (model, _, _), f in self.finished.items() if model == handle.model),
                key=lambda f: (f.prompt_index, f.index),
            )
        )
        completion = sum(f.completion_tokens for f in outputs)
        prompt_ids = self.prompt_ids[handle.model]
        generation = since(handle.admitted, handle.finished)
        return ModelResult(
            model=handle.model,
            outputs=outputs,
            parameters=handle.job.params.applied(),
            prompt_ids=prompt_ids,
            prompt_logprobs={i: tuple(v) for i, v in handle.prompt_logprobs.items()},
            usage=Usage(
                sum(len(ids) for ids in prompt_ids), completion, sum(handle.cached_tokens.values())
            ),
            timings=Timings(
                queue_s=since(handle.created, handle.admitted),
                time_to_first_token_s=since(handle.created, handle.first_token),
                generation_s=generation,
                tokens_per_second=round(completion / generation, 3) if generation else None,
            ),
        )

    def events(self, poll: float) -> Iterator[tuple[str, Event] | None]:
        """(model, event) until every output finished or one failed; None after ``poll`` idle
        seconds.

        However the engine behaves, this ends: a request not done well past its deadline
        ends with a Failed event.
        """
        while not self.done:
            if time.perf_counter() > self.deadline + DEADLINE_GRACE_S:
                yield (
                    self.handles[0].model,
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
            yield handle.model, event
            if isinstance(event, Failed):
                return
