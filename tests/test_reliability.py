"""No client can fail, stall or bloat another's work, over real HTTP (issue: reliability).

Faults that no request can cause on purpose are injected with monkeypatch, each named where
it is; everything else is what a client sends.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask import Flask

from tests.conftest import in_threads, serve, served, tiny_config
from textgen import create_app


def stream_text(url: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    """A streamed /generate: the text and every parsed event (the last is "[DONE]")."""
    events: list[Any] = []
    with requests.post(f"{url}/generate", json={**body, "stream": True}, stream=True) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    text = "".join(e.get("text", "") for e in events if isinstance(e, dict))
    return text, events


STREAMS = [
    {"prompt": "Once upon a time", "max_new_tokens": 24},
    {"prompt": "The capital of France is", "max_new_tokens": 20},
    {"prompt": "Hello", "max_new_tokens": 28},
]


def chat(url: str, **body: Any) -> requests.Response:
    messages = [{"role": "user", "content": "Give me JSON"}]
    full = {"model": "tiny-llama", "messages": messages, "max_tokens": 8, **body}
    return requests.post(f"{url}/v1/chat/completions", json=full, timeout=60)


@pytest.fixture(scope="module")
def small_chunks(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """Prompts prefilled 16 tokens at a time, so that a long prompt takes many chunks."""
    cache = tmp_path_factory.mktemp("chunks")
    return create_app(tiny_config(model_dirs, cache, PREFILL_CHUNK_TOKENS=16))


@pytest.fixture(scope="module")
def chunks_url(small_chunks: Flask) -> Iterator[str]:
    yield from serve(small_chunks)


# --- 1. one request's failure is that request's -------------------------------------------
@pytest.mark.parametrize(
    "schema", [{"$ref": "#"}, {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}]
)
def test_a_schema_that_allows_nothing_is_a_400_and_others_finish(
    live: str, schema: dict[str, Any]
) -> None:
    alone = [stream_text(live, body)[0] for body in STREAMS]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    jobs = [lambda b=b: stream_text(live, b)[0] for b in STREAMS]
    jobs.append(lambda: chat(live, response_format=fmt))
    *texts, bad = in_threads(jobs)
    assert texts == alone
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "response_format"
    assert bad.json()["error"]["code"] == "schema_unsatisfiable"


def test_a_grammar_dead_end_mid_output_ends_that_request_alone(
    live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.grammar import GrammarConstraint, GrammarDeadEnd

    real = GrammarConstraint.__call__

    def dead_after_one(self: GrammarConstraint, ids: Any, scores: Any) -> Any:
        # Fault injected: the grammar allows nothing at the second token ("{}" takes three).
        if self.text:
            raise GrammarDeadEnd()
        return real(self, ids, scores)

    monkeypatch.setattr(GrammarConstraint, "__call__", dead_after_one)
    alone = [stream_text(live, body)[0] for body in STREAMS]
    jobs = [lambda b=b: stream_text(live, b) for b in STREAMS]
    jobs.append(lambda: chat(live, response_format={"type": "json_object"}))
    *streams, bad = in_threads(jobs)
    assert [text for text, _ in streams] == alone
    assert all(events[-1] == "[DONE]" for _, events in streams)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "schema_unsatisfiable"


def test_an_error_in_one_rows_choice_fails_only_its_request(
    live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.sampling import TokenChooser

    real_init, real_choose = TokenChooser.__init__, TokenChooser.choose
    doomed_choosers: set[int] = set()

    def init(self: TokenChooser, params: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, params, *args, **kwargs)
        if params.seed == 13:
            doomed_choosers.add(id(self))

    def broken_for_seed_13(self: TokenChooser, history: list[int], logits: Any) -> int:
        # Fault injected: the sampler of one request (seed 13) raises.
        if id(self) in doomed_choosers:
            raise RuntimeError("boom")
        return real_choose(self, history, logits)

    monkeypatch.setattr(TokenChooser, "__init__", init)
    monkeypatch.setattr(TokenChooser, "choose", broken_for_seed_13)
    sampled = {"prompt": "Once", "strategy": "sampling", "seed": 7, "max_new_tokens": 16}
    others = [*STREAMS, sampled]
    alone = [stream_text(live, body)[0] for body in others]
    doomed = {"prompt": "Hi", "strategy": "sampling", "seed": 13, "max_new_tokens": 16}
    jobs = [lambda b=b: stream_text(live, b)[0] for b in others]
    jobs.append(lambda: requests.post(f"{live}/generate", json=doomed, timeout=60))
    jobs.append(lambda: stream_text(live, doomed)[1])
    *texts, whole, streamed = in_threads(jobs)
    assert texts == alone
    assert whole.status_code == 500 and "boom" not in whole.text
    assert whole.json()["error"]["code"] == "generation_failed"
    assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["type"] == "server_error"


# --- 2. every wait ends ----------------------------------------------------------------
def test_a_repeated_model_name_is_a_400(live: str) -> None:
    body = {"prompt": "Hi", "models": ["tiny-llama", "tiny-llama"], "max_new_tokens": 4}
    response = requests.post(f"{live}/generate", json=body, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "models"


def test_a_request_the_engine_never_finishes_ends_after_its_deadline(
    live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine import submission
    from textgen.engine.events import Finished
    from textgen.engine.request import RequestHandle

    real = RequestHandle.post

    def lose_finished(self: RequestHandle, event: Any) -> None:
        # Fault injected: the engine loses the end of requests with seed 99.
        if isinstance(event, Finished) and self.job.params.seed == 99:
            return
        real(self, event)

    monkeypatch.setattr(RequestHandle, "post", lose_finished)
    monkeypatch.setattr(submission, "DEADLINE_GRACE_S", 0.5)
    body = {"prompt": "Hi", "strategy": "sampling", "seed": 99, "max_new_tokens": 4, "timeout": 1}
    started = time.monotonic()
    whole = requests.post(f"{live}/generate", json=body, timeout=60)
    assert whole.status_code == 500
    assert whole.json()["error"]["code"] == "deadline_exceeded"
    _, events = stream_text(live, body)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 30
    assert requests.get(f"{live}/health", timeout=5).status_code == 200


# --- 4. echo with logprobs in bounded memory, without freezing the batch -----------------
def reference_prompt_logprobs(app: Flask, prompt: list[int], top: int) -> list[Any]:
    loaded = app.extensions["textgen.registry"].engine("tiny-llama").runner.loaded
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for position in range(1, len(prompt)):
        row = logprobs[position - 1]
        values, ids = row.topk(top)
        out.append((float(row[prompt[position]]), ids.tolist()))
    return out


def test_echoed_logprobs_over_many_chunks_equal_one_forward(
    small_chunks: Flask, chunks_url: str
) -> None:
    loaded = small_chunks.extensions["textgen.registry"].engine("tiny-llama").runner.loaded
    prompt = loaded.tokenizer("Once upon a time there was a small cat. " * 8)["input_ids"][:150]
    body = {"model": "tiny-llama", "prompt": prompt, "echo": True, "logprobs": 3}
    response = requests.post(f"{chunks_url}/v1/completions", json={**body, "max_tokens": 1})
    assert response.status_code == 200, response.text
    block = response.json()["choices"][0]["logprobs"]
    assert block["token_logprobs"][0] is None
    expected = reference_prompt_logprobs(small_chunks, prompt, 3)
    served = block["token_logprobs"][1 : len(prompt)]
    assert served == pytest.approx([value for value, _ in expected], abs=1e-4)
    assert all(len(top) == 3 for top in block["top_logprobs"][1 : len(prompt)])


def test_echo_holds_few_positions_logits_at_once(
    small_chunks: Flask, chunks_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.decode import DecodeStep
    from textgen.engine.prefill import ECHO_CHUNK_TOKENS

    sizes: list[int] = []
    real = DecodeStep.forward

    def measured(self: DecodeStep, *args: Any, **kwargs: Any) -> Any:
        logits = real(self, *args, **kwargs)
        sizes.append(logits.shape[0] * logits.shape[1])
        return logits

    monkeypatch.setattr(DecodeStep, "forward", measured)
    loaded = small_chunks.extensions["textgen.registry"].engine("tiny-llama").runner.loaded
    prompt = loaded.tokenizer("Hello world! " * 60)["input_ids"][:200]
    body = {"model": "tiny-llama", "prompt": [prompt] * 4, "echo": True, "logprobs": 1}
    response = requests.post(f"{chunks_url}/v1/completions", json={**body, "max_tokens": 1})
    assert response.status_code == 200
    assert len(response.json()["choices"][3]["logprobs"]["tokens"]) == 201
    assert sizes and max(sizes) <= ECHO_CHUNK_TOKENS  # not 4 x 200 positions at once


def test_a_long_prefill_takes_turns_with_decode_steps(
    chunks_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.batch import RunningBatch
    from textgen.engine.prefill import Prefills

    log: list[str] = []
    real_chunk, real_step = Prefills.run_chunk, RunningBatch.step

    def chunk(self: Prefills, job: Any, budget: int) -> Any:
        log.append(f"chunk{len(job.rows[0].prompt)}")
        return real_chunk(self, job, budget)

    def step(self: RunningBatch) -> None:
        log.append("step")
        real_step(self)

    monkeypatch.setattr(Prefills, "run_chunk", chunk)
    monkeypatch.setattr(RunningBatch, "step", step)
    long_prompt = [10 + (7 * i) % 200 for i in range(200)]
    running = {"prompt": "Hi", "max_new_tokens": 120, "ignore_eos": True}
    long = {"model": "tiny-llama", "prompt": long_prompt, "max_tokens": 2, "temperature": 0}

    def send_long() -> requests.Response:
        time.sleep(0.05)  # once the running request decodes
        return requests.post(f"{chunks_url}/v1/completions", json=long, timeout=60)

    _, response = in_threads([lambda: stream_text(chunks_url, running), send_long])
    assert response.status_code == 200
    chunks = [i for i, entry in enumerate(log) if entry == f"chunk{len(long_prompt)}"]
    assert len(chunks) >= 10  # 200 tokens, 16 at a time
    between = log[chunks[0] : chunks[-1]]
    assert between.count("step") >= len(chunks) - 1  # the running row stepped between chunks


# --- 5. JSON schemas: size, compile time, compiler off the engine's way ---------------------
def test_a_schema_over_the_size_limit_is_a_400(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    app = create_app(tiny_config(model_dirs, tmp_path, MAX_SCHEMA_BYTES=1024))
    schema = {"enum": [f"value-{i}" for i in range(500)]}
    for url in serve(app):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        response = chat(url, response_format=fmt)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "schema_too_large"


def test_a_slow_schema_times_out_while_streams_flow(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.grammar import GrammarCompiler

    real = GrammarCompiler._compile
    release = threading.Event()

    def slow(self: GrammarCompiler, spec: str) -> Any:
        # Fault injected: a schema whose compile takes until the test lets it finish.
        if "slow" in spec:
            release.wait(30)
        return real(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    app = create_app(tiny_config(model_dirs, tmp_path, GRAMMAR_TIMEOUT=0.5))
    schema = {"type": "object", "properties": {"slow": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for url in serve(app):
        alone = [stream_text(url, body)[0] for body in STREAMS]
        jobs = [lambda b=b, u=url: stream_text(u, b)[0] for b in STREAMS]
        jobs += [lambda u=url: chat(u, response_format=fmt) for _ in range(6)]
        results = in_threads(jobs)
        release.set()
        texts, schemas = results[: len(STREAMS)], results[len(STREAMS) :]
        assert texts == alone  # the streams finished while the compile was stuck
        codes = [r.json()["error"]["code"] for r in schemas]
        assert "schema_too_complex" in codes
        # At most four schemas wait for the compiler; beyond that, come back later.
        busy = [r for r in schemas if r.status_code == 429]
        assert busy and all(int(r.headers["Retry-After"]) >= 1 for r in busy)


def test_indexing_the_vocabulary_is_not_counted_in_a_schemas_limit(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.grammar import GrammarCompiler

    real = GrammarCompiler._initialize

    def slow_index(self: GrammarCompiler) -> None:
        # Fault injected: a busy machine, where a large vocabulary takes long to index.
        time.sleep(1.0)
        real(self)

    monkeypatch.setattr(GrammarCompiler, "_initialize", slow_index)
    app = create_app(tiny_config(model_dirs, tmp_path, GRAMMAR_TIMEOUT=0.3))
    for url in serve(app):
        response = chat(url, response_format={"type": "json_object"})
        assert response.status_code == 200, response.text
        json.loads(response.json()["choices"][0]["message"]["content"])


def test_the_compiled_grammar_cache_is_bounded(app: Flask) -> None:
    from textgen.engine.grammar import GrammarCompiler, GrammarLimits

    loaded = app.extensions["textgen.registry"].engine("tiny-llama").runner.loaded
    limits = GrammarLimits(cache_bytes=256 << 10)
    compiler = GrammarCompiler(loaded.tokenizer, len(loaded.tokenizer), (0,), limits)
    for n in range(8):
        schema = {"enum": [f"v{n}-{i}" for i in range(2000)]}
        compiler.compile(json.dumps({"type": "json_schema", "schema": schema}))
    assert compiler._compiler.get_cache_size_bytes() <= limits.cache_bytes
    compiler.close()


# --- 6. bad input is a 400 naming the field --------------------------------------------
@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "messages.0.content",
        ),
        ("/generate", '{"prompt": "a\\ud800b"}', "prompt"),
        (
            "/generate",
            '{"messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages.0.content",
        ),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("/generate", '{"prompt": "a", "logit_bias": {"\\u00b2": 1}}', "logit_bias"),
        ("/generate", '{"prompt": "a", "logit_bias": {"\\u0661\\u0662": 1}}', "logit_bias"),
        ("/generate", '{"prompt": "a", "logit_bias": {"99999999999999": 1}}', "logit_bias"),
        ("/generate", '{"prompt": "a", "x": ' + "[" * 2000 + "]" * 2000 + "}", None),
        ("/generate", "[" * 100 + "]" * 100, None),
    ],
)
def test_malformed_bodies_are_400s(live: str, path: str, raw: str, param: str | None) -> None:
    response = requests.post(
        f"{live}{path}", data=raw.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param


# --- 10. one request's rows never exceed the batch ---------------------------------------
def test_a_request_with_more_rows_than_the_batch_waits_its_turn(
    app: Flask, live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.batch import RunningBatch

    sizes: list[int] = []
    real = RunningBatch.step

    def counted(self: RunningBatch) -> None:
        sizes.append(len(self.rows))
        real(self)

    monkeypatch.setattr(RunningBatch, "step", counted)
    body = {
        "prompt": [f"prompt {i}" for i in range(8)],
        "strategy": "sampling",
        "num_return_sequences": 16,
        "seed": 1,
        "max_new_tokens": 4,
        "ignore_eos": True,
    }
    response = requests.post(f"{live}/generate", json=body, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["results"][0]["outputs"]) == 128
    limit = app.extensions["textgen.registry"].settings.max_batch
    assert sizes and max(sizes) <= limit


# --- 14. caps and what errors show ---------------------------------------------------
def test_tokenize_has_the_prompt_cap(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    app = create_app(tiny_config(model_dirs, tmp_path, MAX_PROMPT_TOKENS=50))
    for url in serve(app):
        response = requests.post(f"{url}/tokenize", json={"prompt": "Hello world " * 100})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        response = requests.post(f"{url}/detokenize", json={"tokens": [1] * 51})
        assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


def test_health_shows_no_file_paths(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    app = create_app(
        {"MODELS": f"b={broken}", "MODEL_CACHE": str(tmp_path / "cache"), "TORCH_THREADS": 1}
    )
    for url in serve(app):
        deadline = time.monotonic() + 60
        while (health := requests.get(f"{url}/health").json())["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert str(tmp_path) not in json.dumps(health) and "broken-model" in health["detail"]
        response = requests.post(f"{url}/generate", json={"prompt": "Hi"})
        assert response.status_code == 503 and str(tmp_path) not in response.text


# --- 7. overload is refused at once -------------------------------------------------------
def test_a_full_queue_refuses_before_tokenizing(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.runner import ModelRunner

    prepared: list[int] = []
    real = ModelRunner.prepare

    def counting(self: ModelRunner, *args: Any, **kwargs: Any) -> Any:
        prepared.append(1)
        return real(self, *args, **kwargs)

    with served(tiny_config(model_dirs, tmp_path, MAX_QUEUE=1, MAX_BATCH=1)) as url:
        monkeypatch.setattr(ModelRunner, "prepare", counting)
        long = {"prompt": "Hi", "max_new_tokens": 200, "ignore_eos": True, "stream": True}
        with requests.post(f"{url}/generate", json=long, stream=True, timeout=60) as r:
            assert r.status_code == 200
            refused = requests.post(f"{url}/generate", json={"prompt": "Hi"}, timeout=60)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
        assert prepared == [1]  # the refused request was never tokenized
