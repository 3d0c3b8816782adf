"""Domain errors every layer may raise (a leaf: imports nothing of textgen)."""

from __future__ import annotations

import re
from typing import Any

# The OpenAI error type of each HTTP status textgen answers with.
TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """Every error's JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestRejected(ValueError):
    """The request cannot run on this model (too long, no chat template...); a client error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class UnknownModel(LookupError):
    """No model of that name is configured."""


class ModelsNotReady(RuntimeError):
    """Models are still loading, or loading failed."""


def context_exceeded(
    limit: int, prompt: int, completion: int | None, chat: bool
) -> RequestRejected:
    """The context overflow error in OpenAI's words and code, which client libraries look for
    (LiteLLM's ContextWindowExceededError, LangChain's OpenAIContextOverflowError)."""
    where = "messages" if chat else "prompt"
    if completion is None:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your {where} "
            f"resulted in {prompt} tokens. Please reduce the length of the {where}."
        )
    else:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the {where}, {completion} in the "
            f"completion). Please reduce the length of the {where} or completion."
        )
    # The field to change: the prompt when it alone is too long, else the new-token budget.
    param = where if completion is None or prompt >= limit else "max_new_tokens"
    return RequestRejected(message, param, "context_length_exceeded")


class QueueFull(Exception):
    """The engine holds as much work as it may; try again after ``retry_after`` seconds."""

    code = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def detail(self) -> str:
        """What the client is told (the app's 429 and the worker's own say the same)."""
        return f"{self}; retry after {self.retry_after} s"


# An absolute path: a slash-led run of path characters with at least two components.
_PATH = re.compile(r"(?<![\w/.:])(?:/[\w.@+~-]+){2,}/?")


def without_paths(text: str) -> str:
    """``text`` with absolute file paths cut to their last part, for clients to see (the log
    keeps the whole message)."""
    return _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
