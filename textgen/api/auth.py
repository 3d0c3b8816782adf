"""The guard: with TEXTGEN_AUTH=api_key, every route but health and docs needs a valid key,
and a key limited to some models gets 403 for the others."""

from __future__ import annotations

import ipaddress
import logging

from flask import Flask, g, request

from textgen.api.errors import Forbidden, Unauthorized
from textgen.auth.store import KeyStore, Principal
from textgen.config import Settings

log = logging.getLogger(__name__)

# Open without a key: whether the server is up, and how to use it.
OPEN_ENDPOINTS = {"info.get_health", "info.get_liveness", "info.get_readiness", "static"}
OPEN_BLUEPRINTS = {"api-docs"}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="textgen"'}


def principal() -> Principal | None:
    """Who this request comes from (None when auth is off)."""
    found: Principal | None = g.get("principal")
    return found


def check_model(name: str) -> None:
    """403 unless this request's key may use the model."""
    who = principal()
    if who is not None and not who.may_use(name):
        raise Forbidden(
            f"the key {who.name!r} may not use model {name!r}", "model", "model_not_allowed"
        )


def init_auth(app: Flask, settings: Settings) -> None:
    """Check keys before every view that needs one (or warn when nothing is checked)."""
    if settings.auth == "none":
        if not loopback(settings.bind):
            log.warning(
                "TEXTGEN_AUTH=none and TEXTGEN_BIND=%s: anyone who can reach this address can "
                "use every model; set TEXTGEN_AUTH=api_key",
                settings.bind,
            )
        return
    store = KeyStore(settings.database_url)
    app.extensions["textgen.keys"] = store

    @app.before_request
    def authenticate() -> None:
        endpoint = request.endpoint or ""
        if endpoint in OPEN_ENDPOINTS or endpoint.split(".")[0] in OPEN_BLUEPRINTS:
            return
        if request.method == "OPTIONS":
            return  # a CORS preflight carries no credentials
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "send an API key as Authorization: Bearer <key>",
                code="missing_api_key",
                headers=CHALLENGE,
            )
        found = store.verify(token.strip())
        if found is None:
            # The same answer for a malformed, unknown or revoked key: nothing to probe.
            raise Unauthorized(
                "the API key is not valid", code="invalid_api_key", headers=CHALLENGE
            )
        g.principal = found


def loopback(bind: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if bind.startswith("unix:"):
        return True
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
