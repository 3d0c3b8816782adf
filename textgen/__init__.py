"""textgen: a text-generation HTTP API for open language models on CPUs."""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

from flask import Flask

__version__ = "0.1.0"


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings, routes and their OpenAPI document, error handlers, and this
    worker's model registry."""
    from textgen.api import generate, info, tokenize, users
    from textgen.api.access import init_access
    from textgen.api.auth import init_auth
    from textgen.api.docs import init_docs
    from textgen.api.errors import register_error_handlers
    from textgen.api.limits import init_limits
    from textgen.api.tracing import init_request_ids
    from textgen.config import PREFIX, check_unknown_env, load_settings
    from textgen.openai import chat, completions, responses_api
    from textgen.openai import models as openai_models
    from textgen.runtime import configure_torch
    from textgen.service.registry import ModelRegistry

    app = Flask(__name__)
    if test_config is None:
        check_unknown_env(os.environ)
        app.config.from_prefixed_env(PREFIX)
    else:
        app.config.update(test_config)
    settings = load_settings(app.config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    configure_torch(settings.torch_threads)

    app.extensions["textgen.settings"] = settings  # the caps request validation reads
    api = init_docs(app)
    for module in (generate, tokenize, info, completions, chat, responses_api, openai_models):
        api.register_blueprint(module.bp)
    if settings.auth == "jwt":
        api.register_blueprint(users.bp)
    if settings.auth != "none":
        # Swagger UI's "Authorize" button, and every route's documented credential.
        api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
        api.spec.options["security"] = [{"bearer": []}]
    # After the docs: their error handler is replaced by textgen's one error shape.
    register_error_handlers(app)
    init_request_ids(app)
    init_access(app, settings)
    init_auth(app, settings)
    init_limits(app, settings)  # after auth: limits count per key or user

    registry = ModelRegistry(settings)
    app.extensions["textgen.registry"] = registry
    # Engine threads must end before the interpreter does (see Engine.stop).
    atexit.register(registry.close)
    registry.start()
    return app
