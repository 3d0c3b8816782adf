"""Strategy presets and parameter mapping, without a model."""

from __future__ import annotations

import pytest

from textgen.generation.strategies import (
    STRATEGIES,
    StrategyError,
    describe_strategies,
    infer_strategy,
    resolve_params,
)


def test_greedy_is_default_and_deterministic() -> None:
    params = resolve_params({})
    assert params.strategy == "greedy"
    assert params.generation_kwargs()["do_sample"] is False
    assert params.generation_kwargs()["num_beams"] == 1
    assert "seed" not in params.applied()


def test_sampling_preset_defaults_and_overrides() -> None:
    params = resolve_params({"strategy": "sampling", "temperature": 0.3, "seed": 7})
    kwargs = params.generation_kwargs()
    assert kwargs["do_sample"] is True
    assert kwargs["temperature"] == 0.3
    assert kwargs["top_p"] == STRATEGIES["sampling"].defaults["top_p"]
    assert params.seed == 7


def test_top_k_preset() -> None:
    params = resolve_params({"strategy": "top_k"})
    assert params.top_k == 50 and params.do_sample


def test_beam_preset_and_limits() -> None:
    params = resolve_params({"strategy": "beam", "num_beams": 3, "num_return_sequences": 2})
    kwargs = params.generation_kwargs()
    assert kwargs["num_beams"] == 3 and kwargs["early_stopping"] is True
    with pytest.raises(StrategyError) as err:
        resolve_params({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3})
    assert err.value.param == "num_return_sequences"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"num_beams": 3}, "beam"),
        ({"do_sample": True}, "sampling"),
        ({"temperature": 0.5}, "sampling"),
        ({"top_k": 10}, "top_k"),
        ({"max_new_tokens": 5}, "greedy"),
    ],
)
def test_strategy_inferred_from_fields(fields: dict, expected: str) -> None:
    assert infer_strategy(fields) == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"strategy": "greedy", "temperature": 0.5}, "temperature"),
        ({"strategy": "greedy", "do_sample": True}, "do_sample"),
        ({"strategy": "sampling", "num_beams": 4}, "num_beams"),
        ({"strategy": "greedy", "num_return_sequences": 2}, "num_return_sequences"),
        ({"strategy": "beam", "top_p": 0.5}, "top_p"),
        ({"strategy": "greedy", "seed": 3}, "seed"),
    ],
)
def test_fields_the_strategy_ignores_are_rejected(fields: dict, param: str) -> None:
    with pytest.raises(StrategyError) as err:
        resolve_params(fields)
    assert err.value.param == param


def test_describe_lists_every_strategy_with_parameters() -> None:
    described = {s["name"]: s for s in describe_strategies({"temperature": {"min": 0.01}})}
    assert set(described) == {"greedy", "beam", "sampling", "top_k"}
    assert described["sampling"]["parameters"]["temperature"] == {"min": 0.01, "default": 0.8}
    assert "temperature" not in described["greedy"]["parameters"]
