"""Why an output ends, decided in one place (pure, tested without a model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from textgen.generation.stopping import StopSequenceMatcher


class FinishReason(StrEnum):
    """How an output ended, as /generate reports it."""

    EOS = "eos"  # the model ended it
    STOP = "stop"  # a stop string
    LENGTH = "length"  # the token budget
    TIME_LIMIT = "time_limit"  # the request's deadline
    REPETITION = "repetition"  # the output went round in a loop (repetition_stop)
    CANCELLED = "cancelled"  # the client left (never reported: nobody reads it)

    @property
    def openai(self) -> str:
        """OpenAI's name for it: the model's end and a stop string are both "stop"."""
        ended = (FinishReason.EOS, FinishReason.STOP, FinishReason.REPETITION)
        return "stop" if self in ended else self.value


@dataclass(frozen=True)
class StoppingCriteria:
    """When one output must end: its end-of-sequence tokens, stop strings, budget, deadline."""

    eos: frozenset[int]
    budget: int
    stops: StopSequenceMatcher
    repeats: int = 0  # end an output that repeats a block of tokens this many times (0: never)

    def after(
        self, token: int, text: str, generated: int, expired: bool, output: Sequence[int] = ()
    ) -> FinishReason | None:
        """The reason to end after ``token`` (the ``generated``-th, ending ``output``) made
        the text ``text``, or None to go on. The model's end wins over a stop string, which
        wins over a loop, then the budget, then the deadline."""
        if token in self.eos:
            return FinishReason.EOS
        if self.stops.find(text) is not None:
            return FinishReason.STOP
        if self.repeats and looping(output, self.repeats):
            return FinishReason.REPETITION
        if generated >= self.budget:
            return FinishReason.LENGTH
        if expired:
            return FinishReason.TIME_LIMIT
        return None


# The longest block of tokens a loop is looked for in (a sentence or two).
LONGEST_LOOP = 48


def looping(tokens: Sequence[int], repeats: int) -> bool:
    """Whether ``tokens`` end with one block of 1 to LONGEST_LOOP tokens written ``repeats``
    times in a row ("the cat sat. the cat sat. the cat sat.")."""
    count = len(tokens)
    tail = list(tokens[-LONGEST_LOOP * repeats :])
    for period in range(1, min(LONGEST_LOOP, count // repeats) + 1):
        if tail[len(tail) - period * repeats :] == tail[len(tail) - period :] * repeats:
            return True
    return False


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
