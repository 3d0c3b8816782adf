"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from textgen.api import current_registry
from textgen.api.errors import NotFound

bp = Blueprint("openai_models", __name__)


def model_object(entry: dict[str, Any], created: int) -> dict[str, Any]:
    """A registry entry in OpenAI's model shape (with textgen's facts alongside)."""
    return {
        "id": entry["name"],
        "object": "model",
        "created": created,
        "owned_by": "textgen",
        "max_model_len": entry.get("context_length"),
        "status": entry["status"],
    }


@bp.get("/v1/models")
def list_models() -> Response:
    """Every configured model."""
    registry = current_registry()
    created = registry.started_at
    return jsonify(
        {"object": "list", "data": [model_object(m, created) for m in registry.describe()]}
    )


@bp.get("/v1/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    """One model by id (ids may contain slashes, as Hub ids do)."""
    registry = current_registry()
    for entry in registry.describe():
        if entry["name"] == model_id:
            return jsonify(model_object(entry, registry.started_at))
    raise NotFound(f"model {model_id!r} does not exist", "model", "model_not_found")
