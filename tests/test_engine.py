"""The engine through HTTP: batching gives the same results, requests join and leave it."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask

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
    results: list[Any] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = post(app, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


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
