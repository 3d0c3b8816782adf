"""Passwords: hashed with argon2id, and a policy that refuses the weak and the well known."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 12
# Longer passwords are refused rather than hashed: nobody types more, and argon2 takes
# its time over whatever it is given.
MAX_LENGTH = 256
# The default credentials of the projects textgen grew from, and the commonest passwords: a
# password anyone would try first is refused whatever its length.
KNOWN = frozenset(
    p.casefold()
    for p in (
        "admin",
        "StrongPass123!",
        "password",
        "password123",
        "password1234",
        "123456789012",
        "qwertyuiopasdf",
        "changeme",
        "letmein",
        "administrator",
    )
)

# argon2-cffi's defaults are RFC 9106's second recommendation (argon2id, t=3, 64 MiB, p=4).
HASHER = PasswordHasher()


class WeakPassword(ValueError):
    """A password the policy refuses (the message says why, never the password)."""


def check_policy(username: str, password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"a password may have at most {MAX_LENGTH} characters")
    folded = password.casefold()
    if folded in KNOWN or (len(username) >= 4 and username.casefold() in folded):
        raise WeakPassword("that password is too easy to guess")


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Whether the password is the one hashed (constant time in the password)."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether a hash was made with older parameters than the hasher's current ones."""
    return HASHER.check_needs_rehash(stored)


# Checked when a username is unknown, so that a login takes as long as for a known one and
# its timing does not tell which usernames exist.
DECOY = HASHER.hash("textgen decoy password")
