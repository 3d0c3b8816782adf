"""Engine behaviour that needs a model slow enough to watch: cancellation, 429s, deadlines."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask

from tests.conftest import EMBEDDED_CACHE
from tests.test_engine import concurrently, post, text
from textgen import create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_queue_app() -> Flask:
    return create_app(
        {
            "MODELS": "smollm2-135m-instruct",
            "MODEL_CACHE": str(EMBEDDED_CACHE),
            "LOAD_MODE": "sync",
            "MAX_QUEUE": 1,
        }
    )


def metrics(app: Flask) -> dict[str, Any]:
    return app.extensions["textgen.registry"].engine(None).metrics.snapshot()  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_concurrent_greedy_equals_one_at_a_time() -> None:
    # In float32, as the engine issue asks: the float16, int8 and int4 kernels round
    # differently depending on how many rows share a matmul, so batched greedy output may
    # differ there in a near tie.
    app = create_app(
        {
            "MODELS": "smollm2-135m-instruct#float32",
            "MODEL_CACHE": str(EMBEDDED_CACHE),
            "LOAD_MODE": "sync",
        }
    )
    prompts = ["What is 2+2?", "Name a colour.", "Say hello in French.", "Count to five."]
    bodies = [{"messages": [{"role": "user", "content": p}], "max_new_tokens": 24} for p in prompts]
    alone = [text(post(app, body)) for body in bodies]
    assert [text(r) for r in concurrently(app, bodies)] == alone


def test_closing_a_stream_stops_generation(small_queue_app: Flask) -> None:
    before = metrics(small_queue_app)
    response = small_queue_app.test_client().post(
        "/generate",
        json={
            "prompt": "Tell me a long story.",
            "chat": True,
            "max_new_tokens": 400,
            "stream": True,
        },
        buffered=False,
    )
    stream = iter(response.response)
    next(stream)
    next(stream)
    response.close()  # the client goes away after two events
    wait_for(lambda: metrics(small_queue_app)["cancelled"] == before["cancelled"] + 1)
    wait_for(lambda: metrics(small_queue_app)["running"] == 0)
    after = metrics(small_queue_app)
    assert after["generated_tokens"] - before["generated_tokens"] < 50  # far fewer than 400
    # The slot is free again: with a queue of one, a new request is accepted.
    assert post(small_queue_app, {"prompt": "Hi", "max_new_tokens": 2})


def test_full_queue_answers_429_then_recovers(small_queue_app: Flask) -> None:
    client = small_queue_app.test_client()
    results: dict[str, Any] = {}

    def long_request() -> None:
        results["long"] = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 60})

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_for(
        lambda: (
            metrics(small_queue_app)["generated_tokens"] > 0
            and metrics(small_queue_app)["running"] == 1
        )
    )
    refused = small_queue_app.test_client().post("/generate", json={"prompt": "Hi"})
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.get_json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    thread.join(timeout=120)
    assert results["long"].status_code == 200
    assert post(small_queue_app, {"prompt": "Hi", "max_new_tokens": 2})


def test_deadline_ends_with_time_limit(embedded_app: Flask) -> None:
    started = time.monotonic()
    body = post(embedded_app, {"prompt": "Once upon a time", "max_new_tokens": 1000, "timeout": 1})
    output = body["results"][0]["outputs"][0]
    assert output["finish_reason"] == "time_limit"
    assert 0 < output["completion_tokens"] < 1000
    assert time.monotonic() - started < 30


def test_beam_search_runs_through_the_engine(embedded_app: Flask) -> None:
    body = post(
        embedded_app,
        {
            "prompt": "The sky is",
            "strategy": "beam",
            "num_beams": 3,
            "num_return_sequences": 2,
            "max_new_tokens": 8,
        },
    )
    assert len(body["results"][0]["outputs"]) == 2
    # Its rows leave the batch right after the response is sent.
    deadline = time.monotonic() + 10
    while metrics(embedded_app)["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metrics(embedded_app)["running"] == 0
