"""POST /generate: one or more prompts on one or more models."""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from textgen.api.schemas import GenerateRequest, GenerateSchema, load_body
from textgen.generation.runner import ModelResult
from textgen.models.registry import ModelRegistry

bp = Blueprint("generate", __name__)


@bp.post("/generate")
def create_generation() -> Response:
    """Generate text for the body's prompt(s) with each requested model."""
    registry: ModelRegistry = current_app.extensions["textgen.registry"]
    body: GenerateRequest = load_body(GenerateSchema(registry.settings))
    return jsonify(run_generation(registry, body))


def run_generation(registry: ModelRegistry, body: GenerateRequest) -> dict[str, Any]:
    """Check the request against every model first, then generate with each in turn."""
    runners = [registry.runner(name) for name in body.models]
    jobs = [runner.prepare(body.prompts, body.params) for runner in runners]
    results = [runner.run(job) for runner, job in zip(runners, jobs, strict=True)]
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {
        "id": f"gen-{uuid.uuid4().hex}",
        "object": "generation",
        "created": int(time.time()),
        "results": [result_body(r) for r in results],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def result_body(result: ModelResult) -> dict[str, Any]:
    """One model's part of the response."""
    return {
        "model": result.model,
        "outputs": [
            {
                "prompt_index": o.prompt_index,
                "index": o.index,
                "text": o.text,
                "finish_reason": o.finish_reason,
                "completion_tokens": o.completion_tokens,
            }
            for o in result.outputs
        ],
        "parameters": result.parameters,
        "usage": usage(result.prompt_tokens, result.completion_tokens),
        "timings": result.timings,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Token counts in the OpenAI shape."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
