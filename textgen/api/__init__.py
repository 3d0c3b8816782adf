"""HTTP layer: error handling, request schemas and the routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:  # the schemas in this package are read without the model stack
    from textgen.engine.scheduler import Engine
    from textgen.service.registry import ModelRegistry


def current_registry() -> ModelRegistry:
    """This worker's model registry (set up by create_app)."""
    registry: ModelRegistry = current_app.extensions["textgen.registry"]
    return registry


def current_engine(name: str | None) -> Engine:
    """The engine of a model this request may use (the default model when None)."""
    from textgen.api.auth import check_model

    registry = current_registry()
    check_model(name or registry.default_name)
    return registry.engine(name)
