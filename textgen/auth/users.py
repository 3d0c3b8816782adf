"""User accounts, kept in textgen's database (textgen.auth.db); passwords as argon2id hashes."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import Boolean, DateTime, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from textgen.auth.db import Base, aware, connect, now
from textgen.auth.passwords import (
    DECOY,
    check_policy,
    hash_password,
    needs_rehash,
    verify_password,
)
from textgen.auth.principal import Principal

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class UserError(ValueError):
    """A username taken, unknown or malformed."""


@dataclass(frozen=True)
class Account:
    """What /users/me and `textgen users list` show of a user."""

    username: str
    admin: bool
    rpm: int | None
    tpm: int | None
    created_at: dt.datetime
    last_login_at: dt.datetime | None
    disabled: bool


def account(row: User) -> Account:
    return Account(
        row.username,
        row.admin,
        row.rpm,
        row.tpm,
        aware(row.created_at) or now(),
        aware(row.last_login_at),
        row.disabled_at is not None,
    )


def principal(row: User) -> Principal:
    return Principal("user", row.username, None, row.rpm, row.tpm, admin=row.admin)


class UserStore:
    """Creates users, checks their passwords, and finds the user a token names."""

    def __init__(self, url: str) -> None:
        self.engine = connect(url)

    def create(
        self,
        username: str,
        password: str,
        admin: bool = False,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> Account:
        """A new user; raises UserError for a bad or taken name, WeakPassword for a weak
        password."""
        if not USERNAME.match(username):
            raise UserError(
                "a username has 1-64 letters, digits and _.@- and starts with a letter or digit"
            )
        check_policy(username, password)
        row = User(
            username=username,
            password_hash=hash_password(password),
            admin=admin,
            rpm=rpm,
            tpm=tpm,
            created_at=now(),
        )
        with Session(self.engine) as session:
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                raise UserError(f"the username {username!r} is taken") from None
            return account(row)

    def authenticate(self, username: str, password: str) -> Principal | None:
        """The user whose password this is; None for a wrong password, an unknown or disabled
        user (alike, and in the same time)."""
        with Session(self.engine) as session:
            row = session.scalar(select(User).where(User.username == username))
            if row is None:
                verify_password(DECOY, password)
                return None
            if not verify_password(row.password_hash, password) or row.disabled_at is not None:
                return None
            if needs_rehash(row.password_hash):
                row.password_hash = hash_password(password)
            row.last_login_at = now()
            session.commit()
            return principal(row)

    def find(self, username: str) -> Principal | None:
        """The active user a token names (None once disabled or deleted)."""
        with Session(self.engine) as session:
            row = session.scalar(select(User).where(User.username == username))
            if row is None or row.disabled_at is not None:
                return None
            return principal(row)

    def account(self, username: str) -> Account | None:
        with Session(self.engine) as session:
            row = session.scalar(select(User).where(User.username == username))
            return None if row is None else account(row)

    def list(self) -> list[Account]:
        with Session(self.engine) as session:
            return [account(r) for r in session.scalars(select(User).order_by(User.created_at))]

    def disable(self, username: str) -> None:
        """The user can no longer log in, and its tokens stop working at once."""
        with Session(self.engine) as session:
            row = session.scalar(select(User).where(User.username == username))
            if row is None:
                raise UserError(f"no user is named {username!r}")
            row.disabled_at = row.disabled_at or now()
            session.commit()
