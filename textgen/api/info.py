"""Read-only endpoints: health, models, strategies and server info."""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

from flask import Blueprint, Response, jsonify

from textgen.api import current_registry
from textgen.api.schemas import parameter_ranges
from textgen.generation.strategies import describe_strategies
from textgen.models.memory import process_memory

bp = Blueprint("info", __name__)


@bp.get("/health")
def get_health() -> tuple[Response, int, dict[str, str]] | Response:
    """200 once every model is loaded and warmed up; 503 with the reason before that."""
    status = current_registry().status()
    if status["status"] == "ready":
        return jsonify({"status": "ok", **{k: v for k, v in status.items() if k != "status"}})
    return jsonify(status), 503, {"Retry-After": "5"}


@bp.get("/models")
def list_models() -> Response:
    """Every configured model with its source, size, dtype and context length."""
    reg = current_registry()
    return jsonify({"default": reg.default_name, "models": reg.describe()})


@bp.get("/strategies")
def list_strategies() -> Response:
    """The decoding strategies, their settings and the parameters each accepts."""
    ranges = parameter_ranges(current_registry().settings)
    return jsonify({"strategies": describe_strategies(ranges)})


@bp.get("/info")
def get_info() -> Response:
    """Versions, the torch thread setup and the effective settings (no secrets)."""
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
    return jsonify(body)
