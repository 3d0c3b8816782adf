"""Reading a request body as a JSON object, with the checks every route needs (pure)."""

from __future__ import annotations

import json
from typing import Any

# Deeper than any real request (a JSON schema included); the JSON parser itself fails with a
# RecursionError at about a thousand levels.
MAX_DEPTH = 64


class BodyError(ValueError):
    """The body is not a usable JSON object; ``param`` names the place when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_object(data: bytes) -> dict[str, Any]:
    """The body as a JSON object: valid UTF-8 JSON, at most MAX_DEPTH levels deep, and no
    lone surrogate (JSON's "\\ud800" escape gives a string no tokenizer can encode)."""
    try:
        body = json.loads(data)
    except RecursionError:
        raise BodyError(f"the JSON is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BodyError("the body must be a JSON object")
    check_values(body)
    return body


def check_values(body: dict[str, Any]) -> None:
    """Walk the body without recursion: depth, and strings that are not valid Unicode."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BodyError(f"the JSON is nested more than {MAX_DEPTH} levels deep", path or None)
        if isinstance(value, str):
            if has_surrogate(value):
                raise BodyError("strings must be valid Unicode (no lone surrogates)", path)
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if has_surrogate(key):
                    raise BodyError("keys must be valid Unicode (no lone surrogates)", path or None)
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))


def has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
