"""Per-key (or per-user) rate limits: requests per minute through Flask-Limiter, generated
tokens per minute through the `limits` library on the same storage; in memory for one worker,
or a Redis URL that every worker and instance shares.

A key's own `rpm`/`tpm` win over TEXTGEN_RATE_LIMIT_RPM/TPM, which also apply per client
address when auth is off. A request is refused before it runs if the tokens it may generate
(`max_tokens` x sequences) exceed what is left of its minute; the tokens it did generate are
counted when it ends.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, cast

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded
from limits import RateLimitItemPerMinute
from limits.strategies import FixedWindowRateLimiter, RateLimiter

from textgen.api.auth import DOCS_BLUEPRINT, OPEN_ENDPOINTS, principal
from textgen.api.errors import RateLimited
from textgen.config import Settings

log = logging.getLogger(__name__)
# Flask-Limiter keeps it off the storage's other counters.
TOKENS = "tokens"


# Password guessing and account spam: few tries per client address, whatever other limits.
LOGINS = ("users.issue_token", "users.register")


def address() -> str:
    return f"addr:{request.remote_addr or 'unknown'}"


def client_key() -> str:
    """Whom a request's counters belong to: its key or user, else its client address (the
    proxy's view of it once ProxyFix trusts the proxy)."""
    who = principal()
    return who.ident if who is not None else address()


@dataclass
class TokenBudget:
    """One client's generated tokens per minute (the engine's Budget protocol)."""

    strategy: RateLimiter
    item: RateLimitItemPerMinute
    key: str

    def admit(self, tokens: int) -> None:
        try:
            reset, remaining = self.strategy.get_window_stats(self.item, TOKENS, self.key)
        except Exception:  # the shared store is down: serve rather than fail everyone
            log.warning("rate-limit storage unreachable; tokens are not limited meanwhile")
            return
        if tokens <= remaining:
            # The headers say what is left once this request has generated all it may.
            g.token_window = (self.item.amount, remaining - tokens, reset)
            return
        g.token_window = (self.item.amount, remaining, reset)
        limit = self.item.amount
        if tokens > limit:
            raise RateLimited(
                f"this request may generate {tokens} tokens, more than the {limit} per minute "
                "allowed; lower max_tokens (or n, or num_beams)",
                "max_tokens",
                "tokens_per_minute",
            )
        wait = max(1, math.ceil(reset - time.time()))
        raise RateLimited(
            f"this request may generate {tokens} tokens and {remaining} of the {limit} per "
            f"minute are left; retry after {wait} s",
            code="tokens_per_minute",
            headers={"Retry-After": str(wait)},
        )

    def charge(self, tokens: int) -> None:
        if tokens <= 0:
            return
        try:
            self.strategy.hit(self.item, TOKENS, self.key, cost=tokens)
        except Exception:
            log.warning("rate-limit storage unreachable; %d tokens were not counted", tokens)


class RateLimits:
    """This app's limiter, and the token budgets it gives requests."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        self.settings = settings
        self.limiter = Limiter(
            client_key,
            app=app,
            storage_uri=settings.rate_limit_storage,
            application_limits=[self.request_limit],
            application_limits_exempt_when=self.exempt,
            headers_enabled=True,
            # A Redis that goes away: each worker counts for itself until it is back.
            in_memory_fallback_enabled=True,
            key_prefix="textgen",
        )
        # Counted with a fixed window, which records a request's tokens even when they take
        # it past the limit (a moving window would drop the whole charge).
        self.tokens = FixedWindowRateLimiter(self.limiter.storage)

    def rpm(self) -> int:
        who = principal()
        own = who.rpm if who is not None else None
        return own if own is not None else self.settings.rate_limit_rpm

    def tpm(self) -> int:
        who = principal()
        own = who.tpm if who is not None else None
        return own if own is not None else self.settings.rate_limit_tpm

    def request_limit(self) -> str:
        return f"{max(1, self.rpm())} per minute"

    def exempt(self) -> bool:
        return (
            request.endpoint in OPEN_ENDPOINTS
            or request.blueprint == DOCS_BLUEPRINT
            or request.method == "OPTIONS"
            or not self.rpm()
        )

    def budget(self) -> TokenBudget | None:
        tpm = self.tpm()
        if not tpm:
            return None
        return TokenBudget(self.tokens, RateLimitItemPerMinute(tpm), client_key())


def current_budget() -> TokenBudget | None:
    """The token budget of this request's client (None when unlimited)."""
    limits: RateLimits | None = current_app.extensions.get("textgen.limits")
    return limits.budget() if limits is not None else None


def init_limits(app: Flask, settings: Settings) -> RateLimits:
    """Limit requests and tokens per client (after authentication, which names the client)."""

    @app.errorhandler(RateLimitExceeded)
    def refused(exc: RateLimitExceeded) -> Response:
        from textgen.api.errors import error_response

        return error_response(
            429,
            f"more than {exc.limit.limit.amount} requests per minute; see Retry-After",
            RateLimited.type,
            None,
            "requests_per_minute",
        )

    @app.after_request
    def token_headers(response: Response) -> Response:
        window = g.get("token_window")
        if window is not None:
            limit, remaining, reset = window
            response.headers["X-RateLimit-Limit-Tokens"] = str(limit)
            response.headers["X-RateLimit-Remaining-Tokens"] = str(remaining)
            response.headers["X-RateLimit-Reset-Tokens"] = str(int(reset))
        # Flask-Limiter adds Retry-After to every response it counts; only a refusal means it.
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)
        return response

    # After token_headers: after-request functions run last-registered first, and Flask-Limiter
    # adds its headers in one.
    limits = RateLimits(app, settings)
    app.extensions["textgen.limits"] = limits
    for endpoint in LOGINS:
        view = app.view_functions.get(endpoint)
        if view is not None:
            limit = limits.limiter.limit(f"{settings.login_rpm} per minute", key_func=address)
            app.view_functions[endpoint] = cast(Any, limit(view))
    return limits
