"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from textgen.api import current_registry
from textgen.api.docs import Blueprint
from textgen.api.errors import NotFound
from textgen.api.responses import ErrorSchema
from textgen.openai.responses import OpenAIModelListSchema, OpenAIModelSchema

bp = Blueprint("openai_models", __name__, description="OpenAI-compatible model listing")


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
@bp.response(200, OpenAIModelListSchema)
def list_models() -> dict[str, Any]:
    """Every configured model."""
    registry = current_registry()
    created = registry.started_at
    return {"object": "list", "data": [model_object(m, created) for m in registry.describe()]}


@bp.get("/v1/models/<path:model_id>")
@bp.response(200, OpenAIModelSchema)
@bp.alt_response(404, schema=ErrorSchema, description="no such model")
def retrieve_model(model_id: str) -> dict[str, Any]:
    """One model by id (ids may contain slashes, as Hub ids do)."""
    registry = current_registry()
    for entry in registry.describe():
        if entry["name"] == model_id:
            return model_object(entry, registry.started_at)
    raise NotFound(f"model {model_id!r} does not exist", "model", "model_not_found")
