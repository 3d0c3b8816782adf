"""textgen: a text-generation HTTP API for open language models on CPUs."""

from __future__ import annotations

import atexit
import os
from typing import Any

from flask import Flask

__version__ = "0.1.0"


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings, routes and their OpenAPI document, error handlers, and this
    worker's model registry."""
    from textgen.api import generate, info, observe, playground, tokenize, users
    from textgen.api.access import BehindProxies, init_access
    from textgen.api.auth import init_auth
    from textgen.api.docs import generation_paths, init_docs
    from textgen.api.errors import register_error_handlers
    from textgen.api.limits import init_limits
    from textgen.api.tracing import init_request_ids
    from textgen.config import PREFIX, check_unknown_env, load_settings
    from textgen.logs import configure_logging
    from textgen.models import blockwise
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
    configure_logging(settings.log_level, settings.log_format)
    if settings.trusted_proxies:
        # The client address, scheme and host as the proxy saw them.
        app.wsgi_app = BehindProxies(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign]
    configure_torch(settings.torch_threads)
    blockwise.set_activation_digits(settings.activation_bits // 8)

    app.extensions["textgen.settings"] = settings  # the caps request validation reads
    api = init_docs(app)
    modules = (generate, tokenize, info, observe, completions, chat, responses_api, openai_models)
    for module in modules:
        api.register_blueprint(module.bp)
    if settings.auth == "jwt":
        api.register_blueprint(users.bp)
    app.register_blueprint(playground.bp)  # a page, not an API route: not in the document
    # The worker refuses these itself while every model's queue is full (server/worker.py).
    app.extensions["textgen.generation_paths"] = generation_paths(app)
    if settings.auth != "none":
        # Swagger UI's "Authorize" button, and every route's documented credential.
        api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
        api.spec.options["security"] = [{"bearer": []}]
    # After the docs: their error handler is replaced by textgen's one error shape.
    register_error_handlers(app)
    init_request_ids(app)
    observe.init_observe(app, settings.log_prompts)
    init_access(app, settings)
    init_auth(app, settings)
    init_limits(app, settings)  # after auth: limits count per key or user

    registry = ModelRegistry(settings)
    app.extensions["textgen.registry"] = registry
    # Engine threads must end before the interpreter does (see Engine.stop).
    atexit.register(registry.close)
    registry.start()
    return app
