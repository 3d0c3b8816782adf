"""What an engine reports as it runs, through named methods: its /info snapshot
(EngineMetrics) is one recorder, Prometheus (textgen.service.prometheus) another."""

from __future__ import annotations

from typing import Protocol


class Recorder(Protocol):
    """Called on the engine's thread (and, for submissions and refusals, a handler's)."""

    def submitted(self) -> None:
        """A request joined the queue."""

    def rejected(self, reason: str) -> None:
        """A request was refused before it ran (``queue_full``)."""

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        """A request's first rows entered the batch after ``queue_s`` in the queue."""

    def cached(self, tokens: int) -> None:
        """Prompt tokens continued from the prefix cache instead of computed."""

    def first_token(self, seconds: float) -> None:
        """A request's first token, ``seconds`` after it was submitted."""

    def inter_token(self, seconds: float) -> None:
        """A row's next token, ``seconds`` after its previous one."""

    def joined(self, rows: int) -> None:
        """Prefilled rows joined the batch, each with its first token."""

    def step(self, rows: int, tokens: int, seconds: float) -> None:
        """A decode step over ``rows`` sequences gave ``tokens`` tokens."""

    def drafted(self, guessed: int, kept: int) -> None:
        """A draft of ``guessed`` tokens was checked and ``kept`` of them were right."""

    def cancelled(self) -> None:
        """A request was withdrawn before it completed (its client left)."""

    def load(
        self, queued: int, running: int, pending_tokens: int, prefix_tokens: int, prefix_bytes: int
    ) -> None:
        """The engine's current load."""


class Recorders:
    """Several recorders as one (more can join later)."""

    def __init__(self, *recorders: Recorder) -> None:
        self.recorders = list(recorders)

    def add(self, recorder: Recorder) -> None:
        self.recorders.append(recorder)

    def submitted(self) -> None:
        for r in self.recorders:
            r.submitted()

    def rejected(self, reason: str) -> None:
        for r in self.recorders:
            r.rejected(reason)

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        for r in self.recorders:
            r.admitted(queue_s, prompt_tokens)

    def cached(self, tokens: int) -> None:
        for r in self.recorders:
            r.cached(tokens)

    def first_token(self, seconds: float) -> None:
        for r in self.recorders:
            r.first_token(seconds)

    def inter_token(self, seconds: float) -> None:
        for r in self.recorders:
            r.inter_token(seconds)

    def joined(self, rows: int) -> None:
        for r in self.recorders:
            r.joined(rows)

    def step(self, rows: int, tokens: int, seconds: float) -> None:
        for r in self.recorders:
            r.step(rows, tokens, seconds)

    def drafted(self, guessed: int, kept: int) -> None:
        for r in self.recorders:
            r.drafted(guessed, kept)

    def cancelled(self) -> None:
        for r in self.recorders:
            r.cancelled()

    def load(
        self, queued: int, running: int, pending_tokens: int, prefix_tokens: int, prefix_bytes: int
    ) -> None:
        for r in self.recorders:
            r.load(queued, running, pending_tokens, prefix_tokens, prefix_bytes)
