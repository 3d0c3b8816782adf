"""Read-only endpoints: health, models, strategies and server info."""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

from textgen.api import current_registry
from textgen.api.auth import anonymous
from textgen.api.docs import Blueprint
from textgen.api.responses import (
    HealthSchema,
    InfoSchema,
    LivenessSchema,
    ModelListSchema,
    PresetListSchema,
    StrategyListSchema,
)
from textgen.api.schemas import parameter_ranges
from textgen.generation.presets import describe_presets
from textgen.generation.strategies import describe_strategies
from textgen.models.memory import process_memory

bp = Blueprint("info", __name__, description="Health, models, strategies and server info")


@bp.get("/health")
@bp.response(200, HealthSchema)
@bp.alt_response(503, schema=HealthSchema, description="still loading, or loading failed")
def get_health() -> tuple[dict[str, Any], int, dict[str, str]] | dict[str, Any]:
    """Whether every model is loaded and warmed up.

    200 once they are; 503 with the current step (or why loading failed) before that.
    """
    return readiness()


def readiness() -> tuple[dict[str, Any], int, dict[str, str]] | dict[str, Any]:
    """The loading state: ok, or a 503 with the step or failure."""
    status = current_registry().status()
    if status["status"] == "ready":
        return {"status": "ok", **{k: v for k, v in status.items() if k != "status"}}
    return status, 503, {"Retry-After": "5"}


@bp.get("/livez")
@bp.response(200, LivenessSchema)
def get_liveness() -> dict[str, Any]:
    """Whether the process answers (for a liveness probe: it says nothing about models)."""
    return {"status": "alive", "pid": os.getpid()}


@bp.get("/readyz")
@bp.response(200, HealthSchema)
@bp.alt_response(503, schema=HealthSchema, description="still preparing, or loading failed")
def get_readiness() -> tuple[dict[str, Any], int, dict[str, str]] | dict[str, Any]:
    """Whether this worker should get traffic: 200 once every model is loaded and warmed up,
    503 with the current step (loading, warming up) or the failure before that."""
    return readiness()


@bp.get("/models")
@bp.response(200, ModelListSchema)
def list_models() -> dict[str, Any]:
    """Every configured model with its source, size, dtype and context length."""
    reg = current_registry()
    return {"default": reg.default_name, "models": reg.describe()}


@bp.get("/strategies")
@bp.response(200, StrategyListSchema)
def list_strategies() -> dict[str, Any]:
    """The decoding strategies, what each fixes and the parameters it accepts."""
    ranges = parameter_ranges(current_registry().settings)
    return {"strategies": describe_strategies(ranges)}


@bp.get("/presets")
@bp.response(200, PresetListSchema)
def list_presets() -> dict[str, Any]:
    """Prompt presets for base models, usable by name in /generate (`"preset": "qa"`)."""
    return {"presets": describe_presets()}


@bp.get("/info")
@bp.response(200, InfoSchema)
def get_info() -> dict[str, Any]:
    """Versions, the torch thread setup and the effective settings (no secrets).

    With auth on, a request without credentials sees only the version: paths, settings and
    the process are for those who hold a key or a token.
    """
    if anonymous():
        return {"version": version("textgen")}
    import torch
    import transformers

    body: dict[str, Any] = {
        "version": version("textgen"),
        "pid": os.getpid(),
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        },
        "transformers": transformers.__version__,
        "settings": current_registry().settings.public(),
        "engines": current_registry().engine_metrics(),
        # This worker's memory; PSS divides the pages workers share (the mapped weights).
        "memory": process_memory(),
    }
    return body
