"""Access tokens for users: JWTs signed with HS256 and the server's secret, nothing else.

One algorithm is fixed on both sides: a token whose header names another (``none``, HS512, an
RS256 meant to be checked with a public key) is refused, as is one without ``exp``, ``iat`` and
``sub``, or whose ``exp`` has passed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
ISSUER = "textgen"
MIN_SECRET_BYTES = 32
# Clocks of several instances differ a little.
LEEWAY = dt.timedelta(seconds=10)


class InvalidToken(Exception):
    """A token that does not prove who sent it (the message says why, never the token)."""


@dataclass(frozen=True)
class Issued:
    token: str
    expires_in: int


@dataclass(frozen=True)
class Signer:
    secret: str
    ttl_s: int

    def __post_init__(self) -> None:
        if len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"a JWT secret needs at least {MIN_SECRET_BYTES} bytes")

    def issue(self, subject: str) -> Issued:
        issued = dt.datetime.now(dt.UTC)
        claims = {
            "sub": subject,
            "iss": ISSUER,
            "iat": issued,
            "exp": issued + dt.timedelta(seconds=self.ttl_s),
            "jti": uuid.uuid4().hex,
        }
        return Issued(jwt.encode(claims, self.secret, algorithm=ALGORITHM), self.ttl_s)

    def subject(self, token: str) -> str:
        """Whom a valid token names; InvalidToken for anything else."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the access token has expired") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("the access token is not valid") from None
        subject = claims["sub"]
        if not isinstance(subject, str):
            raise InvalidToken("the access token is not valid")
        return subject
