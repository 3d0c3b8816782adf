"""Why an output ends, decided in one place (pure, tested without a model)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from textgen.generation.stopping import StopSequenceMatcher


class FinishReason(StrEnum):
    """How an output ended, as /generate reports it."""

    EOS = "eos"  # the model ended it
    STOP = "stop"  # a stop string
    LENGTH = "length"  # the token budget
    TIME_LIMIT = "time_limit"  # the request's deadline
    CANCELLED = "cancelled"  # the client left (never reported: nobody reads it)

    @property
    def openai(self) -> str:
        """OpenAI's name for it: the model's end and a stop string are both "stop"."""
        return "stop" if self in (FinishReason.EOS, FinishReason.STOP) else self.value


@dataclass(frozen=True)
class StoppingCriteria:
    """When one output must end: its end-of-sequence tokens, stop strings, budget, deadline."""

    eos: frozenset[int]
    budget: int
    stops: StopSequenceMatcher

    def after(self, token: int, text: str, generated: int, expired: bool) -> FinishReason | None:
        """The reason to end after ``token`` (the ``generated``-th) made the text ``text``,
        or None to go on. The model's end wins over a stop string, which wins over the
        budget, which wins over the deadline."""
        if token in self.eos:
            return FinishReason.EOS
        if self.stops.find(text) is not None:
            return FinishReason.STOP
        if generated >= self.budget:
            return FinishReason.LENGTH
        if expired:
            return FinishReason.TIME_LIMIT
        return None


def settled(reason: FinishReason, stopped: bool) -> FinishReason:
    """An output's reason once its whole text is known: a stop string found in the final text
    (it can end across the last tokens, after ``after`` saw them) wins; the text is cut there."""
    return FinishReason.STOP if stopped else reason


def beam_reason(stopped: bool, ended: bool, interrupted: bool) -> FinishReason:
    """Why a beam-search hypothesis ended, judged when the search ends: a stop string in its
    text, then the model's end token, then the deadline, else the budget."""
    if stopped or ended:
        return settled(FinishReason.EOS, stopped)
    return FinishReason.TIME_LIMIT if interrupted else FinishReason.LENGTH
