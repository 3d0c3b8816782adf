"""POST /generate with "stream": true, on the tiny models."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import tiny_config
from textgen import create_app


def read_stream(client: FlaskClient, **body: Any) -> tuple[list[Any], Any]:
    """Parsed SSE events (dicts, "ping", or "[DONE]") and the response."""
    response = client.post("/generate", json={**body, "stream": True})
    events: list[Any] = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append("ping")
        else:
            assert block.startswith("data: "), block
            payload = block.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events, response


def reassemble(events: list[Any]) -> dict[tuple[str, int, int], str]:
    texts: dict[tuple[str, int, int], str] = {}
    for event in events:
        if isinstance(event, dict) and "text" in event:
            key = (event["model"], event["prompt_index"], event["index"])
            texts[key] = texts.get(key, "") + event["text"]
    return texts


def test_stream_equals_the_whole_response(client: FlaskClient) -> None:
    request = {"prompt": ["Once upon a time", "Hello"], "models": ["tiny-llama", "tiny-gpt2"]}
    whole = client.post("/generate", json={**request, "max_new_tokens": 16}).get_json()
    events, response = read_stream(client, **request, max_new_tokens=16)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert events[-1] == "[DONE]"
    expected = {
        (r["model"], o["prompt_index"], o["index"]): o["text"]
        for r in whole["results"]
        for o in r["outputs"]
    }
    assert reassemble(events) == expected
    finishes = [e for e in events if isinstance(e, dict) and "finish_reason" in e]
    assert len(finishes) == 4
    summary = events[-2]
    assert summary["usage"] == whole["usage"]
    assert [r["model"] for r in summary["results"]] == ["tiny-llama", "tiny-gpt2"]
    assert "timings" in summary["results"][0]


def test_stop_string_never_streams(client: FlaskClient) -> None:
    whole = client.post("/generate", json={"prompt": "Once upon", "max_new_tokens": 20}).get_json()
    text = whole["results"][0]["outputs"][0]["text"]
    stop = text[5:8]
    events, _ = read_stream(client, prompt="Once upon", max_new_tokens=20, stop=stop)
    streamed = "".join(e["text"] for e in events if isinstance(e, dict) and "text" in e)
    assert stop not in streamed
    assert streamed == text[: text.index(stop)]
    finish = next(e for e in events if isinstance(e, dict) and "finish_reason" in e)
    assert finish["finish_reason"] == "stop"


def test_multibyte_characters_are_never_split(client: FlaskClient) -> None:
    # Random tiny models emit byte-level fragments; a delta must never hold half a character
    # that the next delta completes, so joined deltas equal the full decode.
    for seed in range(5):
        request = {"prompt": "日本 🙂", "strategy": "sampling", "seed": seed, "max_new_tokens": 30}
        whole = client.post("/generate", json=request).get_json()["results"][0]["outputs"][0]
        events, _ = read_stream(client, **request)
        deltas = [e["text"] for e in events if isinstance(e, dict) and e.get("text")]
        assert "".join(deltas) == whole["text"]
        assert all(not d.endswith("\ufffd") or d == "\ufffd" for d in deltas[:-1])


def test_pings_while_waiting(model_dirs, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from textgen.engine.batch import RunningBatch

    app = create_app(tiny_config(model_dirs, tmp_path, STREAM_PING_S=0.05))
    real_prefill = RunningBatch.prefill_next

    def slow_prefill(self: RunningBatch) -> None:
        time.sleep(0.5)
        real_prefill(self)

    monkeypatch.setattr(RunningBatch, "prefill_next", slow_prefill)
    events, _ = read_stream(app.test_client(), prompt="Hi", max_new_tokens=3)
    assert events[0] == "ping"
    assert events[-1] == "[DONE]"


def test_error_after_start_is_an_event_then_done(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.batch import RunningBatch

    def broken_step(self: RunningBatch) -> None:
        raise RuntimeError("kaput")

    monkeypatch.setattr(RunningBatch, "step", broken_step)
    events, response = read_stream(client, prompt="Hi", max_new_tokens=10)
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "generation_failed" and "kaput" not in error["message"]
    monkeypatch.undo()
    again, _ = read_stream(client, prompt="Hi", max_new_tokens=3)
    assert again[-1] == "[DONE]" and "error" not in again[-2]


def test_validation_errors_come_before_the_stream(client: FlaskClient) -> None:
    response = client.post("/generate", json={"prompt": "", "stream": True})
    assert response.status_code == 400 and response.is_json
