"""HTTP layer: error handling, request schemas and the routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:  # the schemas in this package are read without the model stack
    from textgen.engine.scheduler import Engine
    from textgen.engine.submission import Submission
    from textgen.generation.prompts import PromptInput
    from textgen.generation.strategies import GenerationParams
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


def submit(
    engines: list[Engine],
    prompts: list[PromptInput],
    params: GenerationParams,
    timeout: float,
    until_context: bool = False,
) -> Submission:
    """Start a request on the engines, metered by its client's token budget (a 429 before
    anything runs when the tokens it may generate are more than its minute has left)."""
    from textgen.api.limits import current_budget
    from textgen.api.observe import watch
    from textgen.engine.submission import Submission

    submission = Submission.start(
        engines, prompts, params, timeout, until_context, current_budget()
    )
    watch(submission)
    return submission
