"""API key format and hashing (pure).

A key is "tg-" + a public lookup id + "." + a 256-bit random secret. Only a SHA-256 of the
secret is stored. A fast hash is enough here, unlike for passwords: the secret is random and
long, so nothing short of 2**256 guesses finds it from its hash, and a fast check keeps every
request's authentication cheap. Digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "tg-"
SHAPE = re.compile(r"^tg-([A-Za-z0-9_-]{12})\.([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    """A key as it is made: the text shown once, and what is stored of it."""

    text: str
    lookup: str
    digest: str


def new_key() -> NewKey:
    lookup, secret = secrets.token_urlsafe(9), secrets.token_urlsafe(32)
    return NewKey(f"{PREFIX}{lookup}.{secret}", lookup, digest(secret))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(text: str) -> tuple[str, str] | None:
    """(lookup id, secret) of a well-formed key, else None."""
    match = SHAPE.match(text)
    return (match.group(1), match.group(2)) if match else None


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)
