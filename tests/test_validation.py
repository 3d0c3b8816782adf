"""Every bad /generate body gets a 4xx JSON error naming the problem; the app keeps serving."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient


def assert_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["ok", ""]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 100000}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": "5"}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 5.5}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": True}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 5, "max_length": 9}, "max_length"),
        ({"prompt": "hi", "temperature": 0}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "strategy": "beam", "num_beams": 17}, "num_beams"),
        (
            {"prompt": "hi", "strategy": "beam", "num_beams": 8, "num_return_sequences": 3},
            "num_return_sequences",
        ),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "hi", "no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
        ({"prompt": "hi", "do_sample": "yes"}, "do_sample"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "stop": ""}, "stop"),
        ({"prompt": "hi", "stop": ["a"] * 9}, "stop"),
        ({"prompt": "hi", "stop": "x" * 300}, "stop"),
        ({"prompt": "hi", "strategy": "creative"}, "strategy"),
        ({"prompt": "hi", "strategy": "greedy", "temperature": 0.7}, "temperature"),
        ({"prompt": "hi", "strategy": "greedy", "do_sample": True}, "do_sample"),
        ({"prompt": "hi", "unknown_field": 1}, "unknown_field"),
        ({"prompt": "hi", "model": "a", "models": ["b"]}, "models"),
        ({"prompt": "hi", "models": []}, "models"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}], "chat": False}, "chat"),
        ({"prompt": "hi", "chat": "true"}, "chat"),
    ],
)
def test_bad_fields_are_400_and_named(client: FlaskClient, body: dict, param: str) -> None:
    error = assert_error(client.post("/generate", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404(client: FlaskClient) -> None:
    error = assert_error(client.post("/generate", json={"prompt": "hi", "model": "gpt-9"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "gpt-9" in error["message"]


def test_non_json_body(client: FlaskClient) -> None:
    assert_error(client.post("/generate", data="not json", content_type="application/json"), 400)
    assert_error(client.post("/generate", data="", content_type="application/json"), 400)


def test_json_that_is_not_an_object(client: FlaskClient) -> None:
    error = assert_error(client.post("/generate", json=["hi"]), 400)
    assert "object" in error["message"]


def test_oversized_body_is_413(client: FlaskClient) -> None:
    # The test app caps bodies at 4096 bytes.
    assert_error(client.post("/generate", json={"prompt": "x" * 5000}), 413)


def test_prompt_over_the_token_cap(app, model_dirs, tmp_path) -> None:
    from tests.conftest import tiny_config
    from textgen import create_app

    small = create_app(tiny_config(model_dirs, tmp_path, MAX_PROMPT_TOKENS=3, WARMUP=False))
    error = assert_error(
        small.test_client().post("/generate", json={"prompt": "Hello world again and again"}), 400
    )
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("This model's maximum context length is 3 tokens.")


def test_errors_leave_the_app_serving(client: FlaskClient) -> None:
    for body in ({"prompt": 1}, {"prompt": "x", "top_p": 9}, {"prompt": "x", "model": "?"}):
        assert client.post("/generate", json=body).status_code in (400, 404)
    assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    assert_error(client.get("/nope"), 404)
    error = assert_error(client.get("/generate"), 405)
    assert error["type"] == "invalid_request_error"


def test_unexpected_failure_is_a_json_500_without_traceback(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen.engine.prefill import Prefills

    def explode(self: Prefills, job: Any, budget: int) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Prefills, "run_chunk", explode)
    response = client.post("/generate", json={"prompt": "Hi"})
    error = assert_error(response, 500)
    assert "secret" not in response.get_data(as_text=True)
    assert error["type"] == "server_error"
    monkeypatch.undo()
    # The engine survived its failure and serves the next request.
    assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
@pytest.mark.parametrize(
    "path", ["/generate", "/v1/completions", "/v1/chat/completions", "/tokenize"]
)
def test_only_json_bodies_are_read(
    client: FlaskClient, content_type: str | None, path: str
) -> None:
    # A cross-site form post (no preflight) must not reach the model.
    body = '{"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}'
    headers = {} if content_type is None else {"Content-Type": content_type}
    error = assert_error(client.post(path, data=body, headers=headers), 415)
    assert error["code"] == "unsupported_media_type"


def test_json_with_a_charset_or_a_json_suffix_is_json(client: FlaskClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = client.post(
            "/tokenize", data='{"prompt": "Hi"}', headers={"Content-Type": content_type}
        )
        assert response.status_code == 200, content_type
