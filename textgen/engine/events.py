"""What an engine tells a request handler: text deltas, finished outputs, failures (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from textgen.generation.finish import FinishReason


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
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Failed:
    """The engine could not complete the request; ``client_error``: because of what the
    request asked for (a 400), not a fault of the server (a 500)."""

    message: str
    client_error: bool = False
    code: str = "generation_failed"
    param: str | None = None


Event = Delta | Finished | Failed
