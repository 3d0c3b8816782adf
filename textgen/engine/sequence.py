"""One output being generated: its tokens, text, stop rules and finish reason."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.engine.draft import NgramDraft
from textgen.engine.sampling import TokenChooser
from textgen.generation.runner import Job
from textgen.generation.stopping import StopSequenceMatcher


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text for one output, with the logprobs of the tokens it completes (if asked)."""

    prompt_index: int
    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """An output is complete."""

    prompt_index: int
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Failed:
    """The engine could not complete the request."""

    message: str


class RequestHandle:
    """What a request handler holds: the events its outputs produce, and a way to cancel."""

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
        self.outputs = len(job.encoded) * job.params.num_return_sequences
        self.done = 0
        self.generated = 0
        # prompt index -> how many of its tokens were continued from the prefix cache.
        self.cached_tokens: dict[int, int] = {}
        # prompt index -> logprob of each prompt token (None for the first), when asked.
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.on_complete: Callable[[RequestHandle], None] | None = None
        self._cancelled = threading.Event()

    @property
    def tokens_budget(self) -> int:
        assert self.job.params.max_new_tokens is not None
        return self.outputs * self.job.params.max_new_tokens

    def cancel(self) -> None:
        """The client left: the engine drops this request at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Delta | Finished | Failed) -> None:
        """Send an event to the handler; the last output's Finished also ends the request."""
        if isinstance(event, Finished):
            self.done += 1
            if self.done == self.outputs:
                self.finished = time.perf_counter()
                # Before the event: once the handler has it, the client may send its next
                # request, and this one's capacity must already be free.
                if self.on_complete is not None:
                    self.on_complete(self)
        self.events.put((self, event))

    @property
    def complete(self) -> bool:
        return self.done >= self.outputs


@dataclass
class Sequence:
    """The state of one output row in the running batch."""

    handle: RequestHandle
    prompt_index: int
    index: int
    prompt: list[int]
    chooser: TokenChooser
    detokenizer: IncrementalDetokenizer
    matcher: StopSequenceMatcher
    eos: frozenset[int]
    budget: int
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    next_input: int = -1
    finish_reason: str | None = None
    last_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: int = 0  # how many of the last logprobs no Delta has carried yet
    drafts: NgramDraft | None = None  # its text indexed for drafts, once it has had one

    def history(self) -> list[int]:
        return self.prompt + self.generated

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take the chosen token: emit the text that is now safe, or finish."""
        self.next_input = token
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.unsent_logprobs += 1
        if token in self.eos:
            self.finish("eos")
            return
        self.detokenizer.push(token)
        text = self.detokenizer.text
        if self.matcher.find(text) is not None:
            self.finish("stop")
        elif len(self.generated) >= self.budget:
            self.finish("length")
        else:
            self.emit_until(len(text) - self.matcher.holdback(text))

    def emit_until(self, end: int) -> None:
        if end > self.emitted:
            text = self.detokenizer.text[self.emitted : end]
            self.emitted = end
            self.handle.post(Delta(self.prompt_index, self.index, text, self.take_logprobs()))

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs no Delta has carried yet."""
        count, self.unsent_logprobs = self.unsent_logprobs, 0
        return tuple(self.logprobs[len(self.logprobs) - count :]) if count else ()

    def finish(self, reason: str) -> None:
        """End the output: send what remains of its text (cut before any stop string)."""
        self.chooser.release()
        self.detokenizer.flush()
        text, stopped = self.matcher.truncate(self.detokenizer.text)
        self.finish_reason = "stop" if stopped else reason
        self.emit_until(len(text))
        if self.unsent_logprobs:
            self.handle.post(Delta(self.prompt_index, self.index, "", self.take_logprobs()))
        self.handle.post(
            Finished(
                self.prompt_index,
                self.index,
                text,
                self.finish_reason,
                len(self.generated),
                tuple(self.logprobs),
            )
        )
