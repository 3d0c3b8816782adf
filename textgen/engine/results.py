"""What a finished submission hands the HTTP layer: frozen results, never the engine's state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from textgen.engine.events import Finished, TokenLogprob


@dataclass(frozen=True)
class Usage:
    """Token counts; ``cached_tokens``: prompt tokens continued from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True)
class Timings:
    """Where one model's time went, from the moment its engine accepted the request."""

    queue_s: float | None
    time_to_first_token_s: float | None
    generation_s: float | None
    tokens_per_second: float | None


@dataclass(frozen=True)
class ModelResult:
    """One model's part of a request: its outputs in order, what they cost, how long."""

    model: str
    outputs: tuple[Finished, ...]  # by (prompt_index, index)
    parameters: Mapping[str, Any]  # the generation settings applied
    prompt_ids: tuple[tuple[int, ...], ...]  # each prompt's tokens, as the model read them
    # prompt index -> logprob of each prompt token (None for the first), when asked.
    prompt_logprobs: Mapping[int, tuple[TokenLogprob | None, ...]]
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Result:
    """Every model's result, and the request's usage over all of them."""

    models: tuple[ModelResult, ...]

    @property
    def usage(self) -> Usage:
        total = Usage(0, 0, 0)
        for result in self.models:
            total += result.usage
        return total


def since(start: float | None, end: float | None) -> float | None:
    """Seconds from ``start`` to ``end`` (rounded to microseconds), if both happened."""
    return round(end - start, 6) if start is not None and end is not None else None
