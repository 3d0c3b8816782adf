"""HTTP layer: error handling, request schemas and the routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:  # the schemas in this package are read without the model stack
    from textgen.service.registry import ModelRegistry


def current_registry() -> ModelRegistry:
    """This worker's model registry (set up by create_app)."""
    registry: ModelRegistry = current_app.extensions["textgen.registry"]
    return registry
