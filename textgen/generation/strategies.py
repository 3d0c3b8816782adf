"""Strategy presets and the mapping from request fields to generation settings (pure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Parameters every strategy accepts.
COMMON = (
    "max_new_tokens",
    "max_length",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "stop",
    "ignore_eos",
)
# Applied per token by the engine; beam search (one whole generate() call) takes none of them.
TOKEN_KNOBS = (
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "min_tokens",
    "repetition_stop",
)
SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p", "seed")


class StrategyError(ValueError):
    """A parameter does not fit the chosen strategy; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Strategy:
    """A named preset: fixed settings, tunable parameters and their defaults."""

    name: str
    description: str
    fixed: dict[str, Any]
    defaults: dict[str, Any]
    tunable: tuple[str, ...] = field(default=())

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.tunable + COMMON


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "greedy",
            "Always the most likely next token: deterministic, best for short factual answers.",
            fixed={"do_sample": False, "num_beams": 1},
            defaults={},
            tunable=TOKEN_KNOBS,
        ),
        Strategy(
            "beam",
            "Beam search: keeps num_beams candidate continuations and returns the most likely "
            "(num_return_sequences of them); deterministic.",
            fixed={"do_sample": False, "early_stopping": True},
            defaults={"num_beams": 4, "num_return_sequences": 1},
            tunable=("num_beams", "num_return_sequences"),
        ),
        Strategy(
            "sampling",
            "Nucleus sampling: draws from the smallest set of tokens whose probability reaches "
            "top_p, sharpened or flattened by temperature; varied, reproducible with a seed.",
            fixed={"do_sample": True, "num_beams": 1},
            defaults={"temperature": 0.8, "top_p": 0.95, "top_k": 0, "num_return_sequences": 1},
            tunable=(*SAMPLING_KNOBS, "num_return_sequences", *TOKEN_KNOBS),
        ),
        Strategy(
            "top_k",
            "Top-k sampling: draws from the k most likely tokens, scaled by temperature; "
            "reproducible with a seed.",
            fixed={"do_sample": True, "num_beams": 1},
            defaults={"top_k": 50, "temperature": 1.0, "top_p": 1.0, "num_return_sequences": 1},
            tunable=(*SAMPLING_KNOBS, "num_return_sequences", *TOKEN_KNOBS),
        ),
    )
}


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides what one generation does, after presets and defaults."""

    strategy: str
    do_sample: bool
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int | None = None
    max_length: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    early_stopping: bool = False
    ignore_eos: bool = False
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    repetition_stop: int = 0  # end an output that repeats a block of tokens this many times
    logprobs: int | None = None  # top alternatives to report per token (0: the chosen one only)
    prompt_logprobs: bool = False
    response_format: str | None = None  # JSON text of {"type": "json_object"|"json_schema", ...}

    def applied(self) -> dict[str, Any]:
        """The settings reported back to the client (knobs left at their neutral value omitted)."""
        values = asdict(self)
        if self.num_beams == 1:
            del values["early_stopping"]
        for name in OPTIONAL:
            if values[name] == OPTIONAL[name]:
                del values[name]
        return {key: value for key, value in values.items() if value not in (None, ())}

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.GenerationConfig`` (length is set by the runner)."""
        kwargs: dict[str, Any] = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.num_beams > 1:
            kwargs["early_stopping"] = self.early_stopping
        if self.do_sample:
            # Every knob explicit, so a model's own sampling defaults cannot leak in.
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


# Fields reported only when they differ from these neutral values.
OPTIONAL: dict[str, Any] = {
    "ignore_eos": False,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
    "repetition_stop": 0,
    "prompt_logprobs": False,
}


def infer_strategy(fields: dict[str, Any]) -> str:
    """The strategy a request means when it names none."""
    if fields.get("num_beams", 1) > 1:
        return "beam"
    sampling = fields.get("do_sample") or "temperature" in fields or "top_p" in fields
    if sampling:
        return "sampling"
    if "top_k" in fields:
        return "top_k"
    return "greedy"


def resolve_params(fields: dict[str, Any]) -> GenerationParams:
    """Map validated request fields onto a strategy preset; reject fields the strategy ignores."""
    name = fields.get("strategy") or infer_strategy(fields)
    strategy = STRATEGIES[name]
    if "do_sample" in fields and fields["do_sample"] != strategy.fixed["do_sample"]:
        raise StrategyError(
            f"{str(fields['do_sample']).lower()} contradicts strategy {name!r}",
            "do_sample",
        )
    if name != "beam" and fields.get("num_beams", 1) != 1:
        raise StrategyError(f"more than 1 beam needs strategy 'beam', not {name!r}", "num_beams")
    for key in (*SAMPLING_KNOBS, *TOKEN_KNOBS, "num_return_sequences"):
        if key in fields and key not in strategy.parameters:
            users = [s.name for s in STRATEGIES.values() if key in s.parameters]
            raise StrategyError(
                f"not used by strategy {name!r}; it applies to {', '.join(users)}", key
            )
    values = {**strategy.defaults, **strategy.fixed}
    values.update({k: v for k, v in fields.items() if k in strategy.parameters})
    if name == "beam" and values["num_return_sequences"] > values["num_beams"]:
        raise StrategyError(
            f"{values['num_return_sequences']} sequences cannot exceed "
            f"num_beams ({values['num_beams']})",
            "num_return_sequences",
        )
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    if "logit_bias" in values:
        values["logit_bias"] = tuple(sorted(values["logit_bias"].items()))
    return GenerationParams(strategy=name, **values)


def describe_strategies(limits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each strategy with its description and parameters (ranges from ``limits``, defaults)."""
    out = []
    for strategy in STRATEGIES.values():
        params = {}
        for key in strategy.parameters:
            entry = dict(limits.get(key, {}))
            if key in strategy.defaults:
                entry["default"] = strategy.defaults[key]
            params[key] = entry
        out.append(
            {
                "name": strategy.name,
                "description": strategy.description,
                "settings": strategy.fixed,
                "parameters": params,
            }
        )
    return out
