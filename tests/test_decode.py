"""The written-out Llama decode step gives transformers' logits bit for bit, and is used."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from textgen.engine.decode import DecodeStep, LlamaDecodeStep, decode_step_for
from textgen.engine.kvcache import BatchCache
from textgen.models.cache import ModelCache
from textgen.models.loading import load_model
from textgen.models.specs import make_spec


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(config).eval()


def decode_both(
    model: Any, rows: int, padded: bool = True, steps: int = 6
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of ``steps`` decode steps after a left-padded prefill, by each implementation."""
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (rows, 9))
    mask = torch.ones(rows, 9, dtype=torch.long)
    if padded:
        mask[0, :4] = 0  # the first row is shorter: left padding, as the engine batches
    results = []
    for step in (DecodeStep(model), LlamaDecodeStep(model)):
        cache, current = BatchCache(), mask.clone()
        logits = []
        with torch.inference_mode():
            model(
                input_ids=prompt,
                attention_mask=current,
                position_ids=(current.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
            )
            for i in range(steps):
                positions = current.sum(-1, keepdim=True)
                current = torch.cat([current, current.new_ones(rows, 1)], dim=1)
                logits.append(step(prompt[:, i : i + 1], positions, current, cache))
        results.append(logits)
    return results[0], results[1]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int4"])
@pytest.mark.parametrize(("rows", "padded"), [(1, False), (1, True), (3, True)])
def test_llama_step_equals_transformers(model_dirs, tmp_path, dtype, rows, padded) -> None:
    loaded = load_model(
        make_spec(str(model_dirs["tiny-llama"]), dtype=dtype), ModelCache(Path(tmp_path))
    )
    assert LlamaDecodeStep.supports(loaded.model)
    # float16 packs q/k/v and gate/up together, which the step calls as one matmul each.
    step = LlamaDecodeStep(loaded.model)
    assert all(step.qkv + step.gate_up) == (dtype == "float16")
    reference, written_out = decode_both(loaded.model, rows, padded)
    for expected, got in zip(reference, written_out, strict=True):
        assert torch.equal(expected, got)


def test_qwen2_step_equals_transformers() -> None:
    model = tiny_qwen2()
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    reference, written_out = decode_both(model, rows=2)
    for expected, got in zip(reference, written_out, strict=True):
        assert torch.equal(expected, got)


def test_the_compiled_steps_rotary_lookup_equals_computing_it() -> None:
    """The compiled step looks its positions' cos and sin up in a table it grows: the values
    must be those computed for the positions themselves, bit for bit, whatever the shape."""
    from textgen.engine.compiled import CompiledForward
    from textgen.engine.decode import rotary_tables

    model = tiny_qwen2()
    # No program runs here: only its cache type is read.
    forward = CompiledForward(model, program=SimpleNamespace(cache_dtype=torch.float32))
    generator = torch.Generator().manual_seed(1)
    for shape, high in [((1, 1), 10), ((16, 1), 300), ((3, 7), 600), ((1, 256), 2000)]:
        positions = torch.randint(0, high, shape, generator=generator)
        expected = rotary_tables(positions, model.model.rotary_emb, forward.head_dim)
        looked_up = forward.rotary(positions)
        assert all(torch.equal(a, b) for a, b in zip(looked_up, expected, strict=True))
    assert forward.rotary_table is not None and len(forward.rotary_table[0]) >= 2000


def test_other_architectures_take_the_transformers_forward(model_dirs) -> None:
    gpt2 = AutoModelForCausalLM.from_pretrained(model_dirs["tiny-gpt2"])
    assert type(decode_step_for(gpt2)) is DecodeStep
    eager = AutoModelForCausalLM.from_pretrained(
        model_dirs["tiny-llama"], attn_implementation="eager"
    )
    assert type(decode_step_for(eager)) is DecodeStep  # only SDPA is written out


def test_engine_uses_the_written_out_step(app) -> None:
    engine = app.extensions["textgen.registry"].engine(None)
    assert isinstance(engine._batch.decode, LlamaDecodeStep)
