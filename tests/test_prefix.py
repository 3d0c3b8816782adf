"""The prefix cache: a prompt that starts like a recent one computes only the rest, and
generates what it would have generated from scratch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from flask import Flask

from tests.conftest import tiny_config
from tests.test_engine import concurrently, post, text
from textgen import create_app
from textgen.engine.prefix import MIN_REUSE, PrefixCache, common_length

BASE = "Once upon a time there was a small village near the sea, and the people"


def layers(tokens: int) -> Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]:
    return lambda: [(torch.zeros(1, 2, tokens, 4), torch.zeros(1, 2, tokens, 4))]


def test_prefix_cache_matches_the_longest_start_within_its_budget() -> None:
    cache = PrefixCache(max_tokens=20)
    cache.store(list(range(10)), layers(10))
    cache.store([0, 1, 2, 3, 4, 5, 70, 71], layers(8))
    assert cache.tokens == 18
    assert cache.bytes == 2 * 18 * 2 * 4 * 4  # keys and values, 2 heads x 4 dims of float32
    hit = cache.match([0, 1, 2, 3, 4, 5, 6, 7, 99])
    assert hit is not None and hit[0] == 8  # the first entry shares 8 tokens, the second 6
    assert cache.match(list(range(10))) is not None
    assert cache.match(list(range(10)))[0] == 9  # type: ignore[index]  # the last token runs
    assert cache.match([0, 1, 2, 50, 51]) is None  # 3 shared tokens < MIN_REUSE
    cache.store([9] * MIN_REUSE, layers(MIN_REUSE))  # over budget: the least recently used goes
    assert cache.tokens == 10 + MIN_REUSE and len(cache) == 2
    assert cache.bytes == 2 * (10 + MIN_REUSE) * 2 * 4 * 4
    hit = cache.match([0, 1, 2, 3, 4, 5, 70, 71, 72])
    assert hit is not None and hit[0] == 6  # its own entry is gone; range(10) shares 6
    cache.store([1, 2], layers(2))  # too short to be worth keeping
    cache.store(list(range(100, 130)), layers(30))  # longer than the whole budget
    assert len(cache) == 2
    assert common_length((1, 2, 3), [1, 2]) == 2

    def no_copy() -> Any:
        raise AssertionError("kept already: no copy should be made")

    cache.store([9] * MIN_REUSE, no_copy)


def greedy_body(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "max_new_tokens": 12, "ignore_eos": True, "strategy": "greedy"}


def greedy(app: Flask, prompt: str) -> str:
    return text(post(app, greedy_body(prompt)))


def engine_counters(app: Flask) -> dict[str, Any]:
    info = app.test_client().get("/info").get_json()
    return info["engines"]["tiny-llama"]  # type: ignore[no-any-return]


def wait_until_running(app: Flask) -> None:
    """Until the engine has a row decoding (at most 60 s)."""
    deadline = time.monotonic() + 60
    while engine_counters(app)["running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize(
    ("model", "dtype", "base", "more"),
    [
        ("tiny-llama", "float32", BASE, " of the village went fishing every morning"),
        ("tiny-llama", "float16", BASE, " of the village went fishing every morning"),
        # GPT-2 (transformers' forward for every step; a 64-token context here)
        ("tiny-gpt2", "float32", "Once upon a time there was a small village", " by the sea"),
    ],
)
def test_a_prompt_reusing_a_prefix_generates_as_from_scratch(
    model_dirs, tmp_path, model, dtype, base, more
) -> None:
    models = [{"name": "tiny-llama", "source": str(model_dirs[model]), "dtype": dtype}]
    reusing = create_app(tiny_config(model_dirs, tmp_path, MODELS=models))
    scratch = create_app(tiny_config(model_dirs, tmp_path, MODELS=models, PREFIX_CACHE_TOKENS=0))
    tokenizer = reusing.extensions["textgen.registry"].engine(None).runner.loaded.tokenizer
    longer = base + more
    prompts = [base, longer, base]  # the second starts like the first; the third is the first
    for prompt in prompts:
        assert greedy(reusing, prompt) == greedy(scratch, prompt), prompt
    first, second = (tokenizer(text)["input_ids"] for text in (base, longer))
    expected = common_length(tuple(first), second) + len(first) - 1
    assert expected >= 2 * MIN_REUSE
    assert engine_counters(reusing)["prompt_tokens_cached"] == expected
    assert engine_counters(scratch)["prompt_tokens_cached"] == 0
    # What the cache holds now: each kept prompt and output, every layer's keys and values.
    counters = engine_counters(reusing)
    loaded = reusing.extensions["textgen.registry"].engine(None).runner.loaded
    config = loaded.model.config
    per_token = (
        config.num_hidden_layers
        * 2
        * 4
        * getattr(config, "num_key_value_heads", config.num_attention_heads)
        * (config.hidden_size // config.num_attention_heads)
    )
    assert counters["prefix_cache_tokens"] > len(second)
    assert counters["prefix_cache_bytes"] == counters["prefix_cache_tokens"] * per_token
    body = {"prompt": base, "max_new_tokens": 2}
    usage = reusing.test_client().post("/generate", json=body).get_json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"] - 1}


def test_a_continuing_prompt_joins_rows_already_decoding(model_dirs, tmp_path) -> None:
    reusing = create_app(tiny_config(model_dirs, tmp_path))
    scratch = create_app(tiny_config(model_dirs, tmp_path, PREFIX_CACHE_TOKENS=0))
    longer = BASE + " of the village went fishing every morning"
    greedy(reusing, BASE)  # now in the prefix cache
    long_body = {"prompt": "Hello", "max_new_tokens": 200, "ignore_eos": True}
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(r=reusing.test_client().post("/generate", json=long_body))
    )
    thread.start()
    wait_until_running(reusing)
    cached_before = engine_counters(reusing)["prompt_tokens_cached"]
    assert greedy(reusing, longer) == greedy(scratch, longer)
    assert engine_counters(reusing)["prompt_tokens_cached"] > cached_before
    thread.join(120)
    assert result["r"].status_code == 200
    assert result["r"].get_json()["results"][0]["outputs"][0]["completion_tokens"] == 200


def test_an_echoed_prompt_runs_whole(model_dirs, tmp_path) -> None:
    """Echo wants logprobs for every prompt token, so the prompt is not continued from the
    cache; its prompt logprobs equal the ones computed without a prefix cache."""
    reusing = create_app(tiny_config(model_dirs, tmp_path))
    scratch = create_app(tiny_config(model_dirs, tmp_path, PREFIX_CACHE_TOKENS=0))
    greedy(reusing, BASE)
    body = {"model": "tiny-llama", "prompt": BASE, "max_tokens": 4, "temperature": 0}
    body.update(echo=True, logprobs=1)
    answers = [
        app.test_client().post("/v1/completions", json=body).get_json()
        for app in (reusing, scratch)
    ]
    logprobs = [a["choices"][0]["logprobs"]["token_logprobs"] for a in answers]
    assert logprobs[0][1:] == pytest.approx(logprobs[1][1:], abs=1e-5)
    assert engine_counters(reusing)["prompt_tokens_cached"] == 0


def test_prompts_continuing_different_prefixes_together(model_dirs, tmp_path) -> None:
    """Prompts that arrive together and continue kept prompts of different lengths run in one
    call (kept columns right-aligned, the rest after them) and each generates as from scratch."""
    reusing = create_app(tiny_config(model_dirs, tmp_path))
    scratch = create_app(tiny_config(model_dirs, tmp_path, PREFIX_CACHE_TOKENS=0))
    short = "The capital of France is a city where"
    greedy(reusing, BASE)
    greedy(reusing, short)
    prompts = [
        BASE + " of the village went fishing",
        short + " many people live",
        BASE + " sang",
        "Numbers 0123 and nothing kept",
    ]
    busy = threading.Thread(
        target=lambda: reusing.test_client().post(
            "/generate", json={"prompt": "Hello", "max_new_tokens": 200, "ignore_eos": True}
        )
    )
    busy.start()  # a running batch, so the prompts below queue and are admitted together
    wait_until_running(reusing)
    results = [text(r) for r in concurrently(reusing, [greedy_body(p) for p in prompts])]
    busy.join(120)
    assert results == [greedy(scratch, prompt) for prompt in prompts]
    assert engine_counters(reusing)["prompt_tokens_cached"] > 0


def test_a_finished_output_is_kept_for_the_next_turn(model_dirs, tmp_path) -> None:
    """A follow-up prompt that repeats the earlier prompt and its output (token for token, as a
    chat's next turn does) reuses the output's keys and values too, and generates as from
    scratch."""
    reusing = create_app(tiny_config(model_dirs, tmp_path))
    scratch = create_app(tiny_config(model_dirs, tmp_path, PREFIX_CACHE_TOKENS=0))
    loaded = reusing.extensions["textgen.registry"].engine(None).runner.loaded
    first = loaded.tokenizer(BASE)["input_ids"]
    greedy(reusing, BASE)  # 12 tokens generated and kept (all but the last)
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([first]), do_sample=False, max_new_tokens=12, min_new_tokens=12
        )
    follow_up = out[0].tolist() + loaded.tokenizer(" and then")["input_ids"]

    def complete(app: Flask) -> dict[str, Any]:
        body = {"model": "tiny-llama", "prompt": follow_up, "max_tokens": 8, "temperature": 0}
        return app.test_client().post("/v1/completions", json=body).get_json()  # type: ignore[no-any-return]

    before = engine_counters(reusing)["prompt_tokens_cached"]
    continued, whole = complete(reusing), complete(scratch)
    assert continued["choices"][0]["text"] == whole["choices"][0]["text"]
    assert engine_counters(reusing)["prompt_tokens_cached"] - before == len(first) + 11
    # Reported as OpenAI does.
    assert continued["usage"]["prompt_tokens_details"] == {"cached_tokens": len(first) + 11}
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
