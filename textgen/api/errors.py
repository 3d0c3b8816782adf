"""One error shape for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from textgen.errors import (
    TYPES_BY_STATUS,
    ModelsNotReady,
    QueueFull,
    RequestRejected,
    UnknownModel,
    error_body,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client sees, with its HTTP status and the OpenAI-style fields."""

    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class Forbidden(APIError):
    status = 403
    type = "permission_error"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"


class GenerationFailed(APIError):
    status = 500
    type = "server_error"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"


def error_response(
    status: int, message: str, type_: str, param: str | None, code: str | None
) -> Response:
    """The JSON error body with its status."""
    response = jsonify(error_body(message, type_, param, code))
    response.status_code = status
    return response


def validation_error(exc: ValidationError) -> InvalidRequest:
    """A marshmallow error as one message that names every bad field (param: the first)."""
    problems = list(flatten(exc.normalized_messages()))
    param = next((path for path, _ in problems if path != "_schema"), None)
    text = "; ".join(msg if path == "_schema" else f"{path}: {msg}" for path, msg in problems)
    return InvalidRequest(text or "invalid request", param=param, code="invalid_value")


def flatten(messages: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted.path, message) pairs from marshmallow's nested error dict."""
    if isinstance(messages, dict):
        out = []
        for key, value in messages.items():
            out.extend(flatten(value, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(messages, list):
        return [pair for item in messages for pair in flatten(item, path)]
    return [(path or "_schema", str(messages))]


def to_api_error(exc: Exception) -> APIError:
    """Map the domain exceptions the routes let through onto API errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, UnknownModel):
        return NotFound(f"model {exc.args[0]!r} does not exist", "model", "model_not_found")
    if isinstance(exc, ModelsNotReady):
        return ServiceUnavailable(
            f"models are not ready: {exc}", code="model_loading", headers={"Retry-After": "5"}
        )
    if isinstance(exc, RequestRejected):
        return InvalidRequest(str(exc), exc.param, exc.code)
    if isinstance(exc, QueueFull):
        return RateLimited(
            exc.detail,
            code=exc.code,
            headers={"Retry-After": str(exc.retry_after)},
        )
    raise TypeError(exc)


def register_error_handlers(app: Flask) -> None:
    """Install the handlers that give every failure the same JSON shape."""

    @app.errorhandler(APIError)
    @app.errorhandler(ValidationError)
    @app.errorhandler(UnknownModel)
    @app.errorhandler(ModelsNotReady)
    @app.errorhandler(RequestRejected)
    @app.errorhandler(QueueFull)
    def handle_api_error(exc: Exception) -> Response:
        error = to_api_error(exc)
        response = error_response(error.status, error.message, error.type, error.param, error.code)
        response.headers.update(error.headers)
        return response

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = error_response(
            status,
            exc.description or exc.name,
            TYPES_BY_STATUS.get(status, "server_error"),
            None,
            exc.name.lower().replace(" ", "_"),
        )
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        if status == 413:
            # The body was not read: what is left of it would be taken for the next request.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal server error", "server_error", None, "internal_error")
