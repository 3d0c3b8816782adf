"""The engine's result API: frozen results that views read instead of the engine's state."""

from __future__ import annotations

import dataclasses

import pytest
from flask import Flask

from textgen.engine.results import Result, Usage, since
from textgen.engine.submission import Submission
from textgen.generation.finish import FinishReason
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import resolve_params


def test_usage_adds_up() -> None:
    total = Usage(3, 4, 1) + Usage(10, 2, 0)
    assert total == Usage(13, 6, 1)
    assert total.total_tokens == 19


def test_since_needs_both_ends() -> None:
    assert since(1.0, 1.25) == 0.25
    assert since(None, 2.0) is None
    assert since(1.0, None) is None


def test_a_submission_hands_out_frozen_results(app: Flask) -> None:
    registry = app.extensions["textgen.registry"]
    engines = [registry.engine("tiny-llama"), registry.engine("tiny-gpt2")]
    params = resolve_params({"strategy": "greedy", "max_new_tokens": 3, "ignore_eos": True})
    prompts = [PromptInput(text="one two"), PromptInput(text="three")]
    submission = Submission.start(engines, prompts, params, deadline_s=60)
    for _ in submission.events(poll=0.5):
        pass
    result = submission.result()
    assert isinstance(result, Result)
    assert [m.model for m in result.models] == ["tiny-llama", "tiny-gpt2"]
    for model in result.models:
        assert [(f.prompt_index, f.index) for f in model.outputs] == [(0, 0), (1, 0)]
        assert all(f.finish_reason is FinishReason.LENGTH for f in model.outputs)
        assert model.usage.completion_tokens == 6
        assert model.usage.prompt_tokens == sum(len(ids) for ids in model.prompt_ids)
        assert model.timings.generation_s is not None and model.timings.generation_s > 0
        assert model.parameters["max_new_tokens"] == 3
    assert result.usage == result.models[0].usage + result.models[1].usage
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.models[0].usage = Usage(0, 0, 0)  # type: ignore[misc]
