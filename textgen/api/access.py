"""Who may reach the API from where: the Host header (DNS rebinding), browsers of other origins
(CORS, through flask-cors; off unless origins are listed), and the proxy in front whose
forwarded headers are believed."""

from __future__ import annotations

import ipaddress
from typing import Any

from flask import Flask, request
from flask_cors import CORS
from werkzeug.middleware.proxy_fix import ProxyFix

from textgen.api.auth import PROBES
from textgen.api.errors import InvalidRequest
from textgen.api.tracing import HEADER as REQUEST_ID
from textgen.config import Settings


def init_access(app: Flask, settings: Settings) -> None:
    """Refuse unlisted hosts (when listed), and answer CORS for the listed origins only."""
    if settings.allowed_hosts:
        allowed = {host.lower() for host in settings.allowed_hosts}

        @app.before_request
        def check_host() -> None:
            # A page on evil.example that rebinds its name to 127.0.0.1 still sends
            # "Host: evil.example": only the names this server goes by are served. Probes
            # (a container's health check, Kubernetes' by the pod's address) say nothing
            # a page could use, and may come by any name.
            if request.endpoint in PROBES:
                return
            name = host_name(request.host)
            if name.lower() not in allowed:
                raise InvalidRequest(f"host {name!r} is not served here", code="host_not_allowed")

    if settings.cors_origins:
        CORS(
            app,
            origins=list(settings.cors_origins),
            allow_headers=["Content-Type", "Authorization", REQUEST_ID],
            expose_headers=[REQUEST_ID, "Retry-After"],
            methods=["GET", "POST", "OPTIONS"],
            max_age=600,
        )


def host_name(host: str) -> str:
    """The Host header without its port ("[::1]:8000" -> "::1", "a.example:80" -> "a.example")."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BehindProxies:
    """WSGI middleware: werkzeug's ProxyFix (one hop of X-Forwarded-For, -Proto, -Host, -Port)
    for connections from a trusted proxy; any other peer's forwarded headers change nothing, so
    a client that reaches gunicorn directly cannot pose as another address."""

    def __init__(self, app: Any, proxies: tuple[str, ...]) -> None:
        self.app = app
        self.fixed = ProxyFix(app, x_for=1, x_proto=1, x_host=1, x_port=1)
        self.networks = [ipaddress.ip_network(p, strict=False) for p in proxies]

    def trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self.trusted(environ.get("REMOTE_ADDR", "")):
            return self.fixed(environ, start_response)
        return self.app(environ, start_response)
