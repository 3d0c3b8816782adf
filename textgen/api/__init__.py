"""HTTP layer: error handling, request schemas and the routes."""

from __future__ import annotations

from flask import current_app

from textgen.models.registry import ModelRegistry


def current_registry() -> ModelRegistry:
    """This worker's model registry (set up by create_app)."""
    registry: ModelRegistry = current_app.extensions["textgen.registry"]
    return registry
