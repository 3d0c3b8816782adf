"""The guard: with TEXTGEN_AUTH=api_key or jwt, every route but health, docs and login needs a
valid key (or, with jwt, a user's access token), and a key limited to some models gets 403 for
the others."""

from __future__ import annotations

import ipaddress
import logging

from flask import Flask, g, request

from textgen.api.errors import Forbidden, Unauthorized
from textgen.auth.keys import PREFIX
from textgen.auth.keystore import KeyStore
from textgen.auth.principal import Principal
from textgen.auth.tokens import InvalidToken, Signer
from textgen.auth.users import UserStore
from textgen.config import Settings

log = logging.getLogger(__name__)

# Whether the server is up: what load balancers, container health checks and Kubernetes ask.
PROBES = {"info.get_health", "info.get_liveness", "info.get_readiness"}
# Open without credentials: the probes, the metrics (deploy/nginx keeps /metrics from
# outside), the playground's page and files (it asks for a key itself), and how to log in.
OPEN_ENDPOINTS = PROBES | {
    "metrics.metrics",
    "playground.index",
    "static",
    "users.issue_token",
    "users.register",
}
DOCS_BLUEPRINT = "api-docs"
# Open too, but credentials sent are checked and show more (/info's paths and settings).
OPTIONAL_ENDPOINTS = {"info.get_info"}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="textgen"'}


def principal() -> Principal | None:
    """Who this request comes from (None when auth is off, or for the anonymous)."""
    found: Principal | None = g.get("principal")
    return found


def anonymous() -> bool:
    """Whether auth is on and this request has shown no credentials."""
    return bool(g.get("auth_on")) and principal() is None


def check_model(name: str) -> None:
    """403 unless this request's key may use the model."""
    who = principal()
    if who is not None and not who.may_use(name):
        raise Forbidden(
            f"the key {who.name!r} may not use model {name!r}", "model", "model_not_allowed"
        )


class Guard:
    """Tells who sent a bearer credential: an API key, or (with jwt) a user's token."""

    def __init__(self, settings: Settings) -> None:
        self.keys = KeyStore(settings.database_url)
        self.users: UserStore | None = None
        self.signer: Signer | None = None
        if settings.auth == "jwt":
            self.users = UserStore(settings.database_url)
            self.signer = Signer(settings.jwt_secret, settings.jwt_ttl)

    def identify(self, credential: str) -> Principal:
        if self.signer is None or self.users is None or credential.startswith(PREFIX):
            found = self.keys.verify(credential)
            if found is None:
                # The same answer for a malformed, unknown or revoked key: nothing to probe.
                raise Unauthorized(
                    "the API key is not valid", code="invalid_api_key", headers=CHALLENGE
                )
            return found
        try:
            subject = self.signer.subject(credential)
        except InvalidToken as exc:
            raise Unauthorized(str(exc), code="invalid_token", headers=CHALLENGE) from None
        user = self.users.find(subject)
        if user is None:
            raise Unauthorized(
                "the access token's user is disabled or gone", code="invalid_token",
                headers=CHALLENGE,
            )  # fmt: skip
        return user


def bearer() -> str | None:
    """The credential of an `Authorization: Bearer` header; None without a header; 401 for
    another scheme or an empty one."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthorized(
            "send credentials as Authorization: Bearer <key or token>",
            code="missing_credentials",
            headers=CHALLENGE,
        )
    return credential.strip()


def init_auth(app: Flask, settings: Settings) -> Guard | None:
    """Check credentials before every view that needs them (or warn when nothing is checked)."""
    if settings.auth == "none":
        if not loopback(settings.bind):
            log.warning(
                "TEXTGEN_AUTH=none and TEXTGEN_BIND=%s: anyone who can reach this address can "
                "use every model; set TEXTGEN_AUTH=api_key or jwt",
                settings.bind,
            )
        return None
    guard = Guard(settings)
    app.extensions["textgen.guard"] = guard
    open_docs = settings.public_docs

    @app.before_request
    def authenticate() -> None:
        g.auth_on = True
        endpoint = request.endpoint or ""
        if endpoint in OPEN_ENDPOINTS or (open_docs and request.blueprint == DOCS_BLUEPRINT):
            return
        if request.method == "OPTIONS":
            return  # a CORS preflight carries no credentials
        credential = bearer()
        if credential is None:
            if endpoint in OPTIONAL_ENDPOINTS:
                return
            raise Unauthorized(
                "send credentials as Authorization: Bearer <key or token>",
                code="missing_credentials",
                headers=CHALLENGE,
            )
        g.principal = guard.identify(credential)

    return guard


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
