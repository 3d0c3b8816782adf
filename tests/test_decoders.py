"""The compiled decoder of the other families the seeds served (GPT-2, Phi): close to
transformers' forward on the same weights, and served through HTTP alone and in a batch."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_config
from tests.test_compiled import PROMPTS, assert_close_to_eager
from tests.test_engine import concurrently, post, text
from tests.tiny_models import save_tiny_gpt2, save_tiny_phi
from textgen import create_app
from textgen.engine.compiled import CompiledForward
from textgen.engine.kvcache import BatchCache
from textgen.models import compiled
from textgen.models.cache import ModelCache
from textgen.models.loading import LoadedModel, load_model
from textgen.models.quantize import BlockLinear, Int8Linear
from textgen.models.specs import make_spec

BUILDERS = {"gpt2": save_tiny_gpt2, "phi": save_tiny_phi}


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: each tiny model is compiled once (about a minute each)."""
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def int8_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, family_cache: Path
) -> LoadedModel:
    source = BUILDERS[request.param](tmp_path_factory.mktemp("tiny") / f"tiny-{request.param}")
    return load_model(make_spec(str(source), dtype="int8"), ModelCache(family_cache), compiled=True)


def test_every_projection_is_quantized_and_compiled(int8_model: LoadedModel) -> None:
    """GPT-2's Conv1D layers are quantized like linear layers (they were left in float32)."""
    assert int8_model.program is not None
    projections = compiled.program_class(int8_model.model).projections(int8_model.model)
    assert projections and all(
        isinstance(layer, Int8Linear) or isinstance(layer, BlockLinear) and layer.bits == 8
        for layer in projections
    )


def test_compiled_logits_stay_close_to_transformers(int8_model: LoadedModel) -> None:
    assert_close_to_eager(int8_model.model, int8_model.program)


def test_served_greedy_follows_transformers(int8_model: LoadedModel, family_cache: Path) -> None:
    """Through HTTP, alone and three at once, the greedy text is the compiled program's, and
    each of its tokens is one transformers' forward ranks best or within the bound of it."""
    source = str(int8_model.prepared.path)
    config = tiny_config({}, family_cache, DRAFT_TOKENS=0)
    config["MODELS"] = [{"name": "tiny", "source": source, "dtype": "int8"}]
    app = create_app(config)
    served = app.test_client().get("/models").get_json()["models"][0]
    assert (served["dtype"], served["compiled"]) == ("int8", True)
    expected = []
    for prompt in PROMPTS:
        ids = int8_model.tokenizer.encode(prompt)
        chosen = step_by_step(int8_model, ids, 12)
        assert_near_best(int8_model.model, ids, chosen)
        expected.append(int8_model.tokenizer.decode(chosen, skip_special_tokens=True))
    bodies = [
        {"prompt": p, "max_new_tokens": 12, "ignore_eos": True, "strategy": "greedy"}
        for p in PROMPTS
    ]
    assert [text(post(app, body)) for body in bodies] == expected
    assert [text(result) for result in concurrently(app, bodies)] == expected


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_int4_stays_close_to_transformers(
    kind: str, tmp_path_factory: pytest.TempPathFactory, family_cache: Path
) -> None:
    """GPT-2 in whole 64-row blocks, and Phi (whose tiny shape is whole blocks already)."""
    build = partial(save_tiny_gpt2, blocks=True) if kind == "gpt2" else BUILDERS[kind]
    source = build(tmp_path_factory.mktemp("blocks") / f"tiny-{kind}-blocks")
    spec = make_spec(str(source), dtype="int4")
    loaded = load_model(spec, ModelCache(family_cache), compiled=True)
    assert loaded.program is not None and compiled.supports(loaded.model, "int4")
    assert_close_to_eager(loaded.model, loaded.program)


def step_by_step(loaded: LoadedModel, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens from a loop over the program, one token per call."""
    forward = CompiledForward(loaded.model, loaded.program)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    cache, chosen = BatchCache(), []
    with torch.inference_mode():
        logits = forward(ids, torch.arange(ids.shape[1])[None], mask, cache)
        for _ in range(tokens):
            chosen.append(int(logits.argmax(-1)))
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            step = torch.tensor([[chosen[-1]]])
            logits = forward(step, mask.sum(-1, keepdim=True) - 1, mask, cache)
    return chosen


def assert_near_best(model: Any, prompt: list[int], chosen: list[int]) -> None:
    """Each chosen token, under transformers' forward over the text before it, is the best or
    within twice assert_close_to_eager's bound of it."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + chosen])).logits[0]
    for number, token in enumerate(chosen):
        scores = logits[len(prompt) + number - 1]
        bound = 0.02 * float(scores.abs().max())
        assert float(scores[token]) >= float(scores.max()) - 2 * bound
