"""The engine through HTTP: batching gives the same results, requests join and leave it."""

from __future__ import annotations

import time
from typing import Any

import torch
from flask import Flask

from tests.conftest import in_threads

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Hello",
    "1, 2, 3,",
    "Accents é à ü and",
    "Numbers 0123",
]


def post(app: Flask, body: dict[str, Any]) -> dict[str, Any]:
    response = app.test_client().post("/generate", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def concurrently(app: Flask, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return in_threads([lambda body=body: post(app, body) for body in bodies])


def text(body: dict[str, Any]) -> str:
    return str(body["results"][0]["outputs"][0]["text"])


def test_concurrent_greedy_equals_one_at_a_time(app: Flask) -> None:
    bodies = [{"prompt": p, "max_new_tokens": 20 + 3 * i} for i, p in enumerate(PROMPTS)]
    alone = [text(post(app, body)) for body in bodies]
    together = [text(result) for result in concurrently(app, bodies)]
    assert together == alone
    steps = app.extensions["textgen.registry"].engine(None).metrics.snapshot()
    assert steps["batch_size"]["p95"] > 1  # they really shared decode steps


def test_sampling_is_reproducible_in_a_batch(app: Flask) -> None:
    body = {"prompt": "Once", "strategy": "sampling", "seed": 11, "max_new_tokens": 16}
    alone = text(post(app, body))
    others = [{"prompt": p, "max_new_tokens": 16} for p in PROMPTS[:3]]
    together = concurrently(app, [body, *others])
    assert text(together[0]) == alone


def test_a_new_request_joins_the_running_batch(app: Flask) -> None:
    """A short request finishes while a long one is still generating: it joined the batch."""
    engine = app.extensions["textgen.registry"].engine(None)
    response = app.test_client().post(
        "/generate",
        json={"prompt": "Once upon a time", "max_new_tokens": 200, "stream": True},
        buffered=False,
    )
    stream = iter(response.response)
    for _ in range(3):  # the long request is generating
        next(stream)
    short = post(app, {"prompt": "Hello", "max_new_tokens": 3})
    still_running = engine.metrics.snapshot()["running"]
    rest = [chunk.decode() for chunk in stream]
    assert short["results"][0]["outputs"][0]["completion_tokens"] == 3
    # Run one after the other, the short request could only have finished after the long one.
    assert still_running >= 1
    assert rest[-1] == "data: [DONE]\n\n"
    long_finish = next(chunk for chunk in rest if "finish_reason" in chunk)
    assert '"completion_tokens": 200' in long_finish


def test_stop_fails_unfinished_work_and_ends_the_thread(model_dirs, tmp_path) -> None:
    import queue

    from tests.conftest import tiny_config
    from textgen import create_app
    from textgen.engine.events import Failed
    from textgen.generation.prompts import PromptInput
    from textgen.generation.strategies import resolve_params

    app = create_app(tiny_config(model_dirs, tmp_path))
    engine = app.extensions["textgen.registry"].engine(None)
    events: queue.Queue[Any] = queue.Queue()
    job = engine.runner.prepare([PromptInput(text="Hi")], resolve_params({"max_new_tokens": 250}))
    engine.submit(job, events, deadline=time.perf_counter() + 60)
    engine.stop()
    assert not engine._thread.is_alive()
    seen = []
    while not events.empty():
        seen.append(events.get()[1])
    assert any(isinstance(e, Failed) and "shutting down" in e.message for e in seen)


def test_process_exits_cleanly_right_after_generating(model_dirs) -> None:
    """Engine threads stop before the interpreter finalizes (no abort at exit)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = f"""
import json
from textgen import create_app
app = create_app({{"MODELS": "{model_dirs["tiny-llama"]}", "MODEL_CACHE": "/tmp/textgen-exit-test",
                  "LOAD_MODE": "sync", "WARMUP": False}})
client = app.test_client()
for fmt in (None, {{"type": "json_object"}}):
    body = {{"messages": [{{"role": "user", "content": "x"}}], "max_tokens": 8}}
    if fmt:
        body["response_format"] = fmt
    assert client.post("/v1/chat/completions", json=body).status_code == 200
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_back_to_back_requests_never_see_a_stale_full_queue(
    model_dirs, tmp_path, monkeypatch
) -> None:
    """A request's slot is free by the time its response arrives."""
    from tests.conftest import tiny_config
    from textgen import create_app
    from textgen.engine.batch import RunningBatch

    app = create_app(tiny_config(model_dirs, tmp_path, MAX_QUEUE=1))
    real_evict = RunningBatch.evict

    def slow_evict(self: RunningBatch) -> None:
        # Bookkeeping after the last token: the client already has its response by now.
        time.sleep(0.05)
        real_evict(self)

    monkeypatch.setattr(RunningBatch, "evict", slow_evict)
    client = app.test_client()
    for i in range(10):
        response = client.post("/generate", json={"prompt": f"Hello {i}", "max_new_tokens": 2})
        assert response.status_code == 200, (i, response.get_json())


def test_retry_after_comes_from_the_measured_speed() -> None:
    from textgen.engine.scheduler import retry_after

    assert retry_after([], 0.1, 0, 0, 100.0) == 1  # idle: at once (1 s at least)
    assert retry_after([100, 300], 0.1, 0, 0, 100.0) == 10  # the first running one ends
    assert retry_after([], 0.1, 2000, 0, 100.0) == 20  # admitted but none running yet
    assert retry_after([10], 0.1, 0, 5000, 100.0) == 50  # too many tokens ahead
    assert retry_after([10**9], 1.0, 0, 0, 1.0) == 600  # never longer than that


def test_an_idle_registry_says_come_back_at_once(app) -> None:
    assert app.extensions["textgen.registry"].retry_after() == 1


def test_a_prefill_chunk_shrinks_while_rows_decode(app: Flask) -> None:
    """A long prompt's chunks are sized to the measured prefill speed while other rows are
    decoding (about SHARED_CHUNK_S each, so their next token is not held up for a whole
    TEXTGEN_PREFILL_CHUNK_TOKENS chunk), and whole when nothing else runs."""
    from textgen.engine.prefill import MIN_CHUNK_TOKENS, SHARED_CHUNK_S

    post(app, {"prompt": "Hello " * 40, "max_new_tokens": 1})  # measures the speed
    prefills = app.extensions["textgen.registry"].engine(None)._batch.prefills
    assert prefills.speed is not None and prefills.speed > 0
    whole = prefills.chunk_tokens
    assert prefills.chunk_budget(decoding=False) == whole
    prefills.speed = 2000.0
    assert prefills.chunk_budget(decoding=False) == whole  # idle: whole chunks
    assert prefills.chunk_budget(decoding=True) == int(2000 * SHARED_CHUNK_S)
    prefills.speed = 10.0
    assert prefills.chunk_budget(decoding=True) == MIN_CHUNK_TOKENS
    prefills.speed = 1e9
    assert prefills.chunk_budget(decoding=True) == whole


def test_argmaxes_choose_as_torch_argmax_does() -> None:
    """The greedy pick goes through NumPy: the first of equal scores, NaN above all, -inf rows,
    bfloat16 logits, and one row or many, as torch.argmax chooses."""
    from textgen.engine.sampling import argmaxes

    nan, inf = float("nan"), float("inf")
    rows = [[1.0, nan, 3.0, nan], [2.0, 5.0, 5.0, 1.0], [-inf] * 4, [inf, 1.0, inf, 0.0]]
    logits = torch.tensor(rows)
    assert argmaxes(logits) == logits.argmax(-1).tolist() == [1, 1, 0, 0]
    random = torch.randn(16, 3, 1000)
    assert argmaxes(random[:, 1]) == random[:, 1].argmax(-1).tolist()  # a strided view
    assert argmaxes(random[0]) == random[0].argmax(-1).tolist()
    halves = random[0].to(torch.bfloat16)
    assert argmaxes(halves) == halves.argmax(-1).tolist()
