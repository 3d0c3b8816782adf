"""API keys, kept in textgen's database (textgen.auth.db)."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import DateTime, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from textgen.auth.db import Base, aware, connect, now
from textgen.auth.keys import matches, new_key, split_key
from textgen.auth.principal import Principal

# Writing last_used_at on every request would make each one a database write.
TOUCH_EVERY = dt.timedelta(minutes=1)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    lookup: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    digest: Mapped[str] = mapped_column(String(64))
    models: Mapped[str | None] = mapped_column(Text, nullable=True)  # a JSON list
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class KeyNameError(LookupError):
    """No such key, or a name already taken."""


class KeyStore:
    """Creates, lists, revokes and checks API keys."""

    def __init__(self, url: str) -> None:
        self.engine = connect(url)

    def create(
        self,
        name: str,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> str:
        """Make a key; its text is returned once and never stored."""
        key = new_key()
        with Session(self.engine) as session:
            if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
                raise KeyNameError(f"a key named {name!r} exists")
            session.add(
                ApiKey(
                    name=name,
                    lookup=key.lookup,
                    digest=key.digest,
                    models=json.dumps(models) if models else None,
                    rpm=rpm,
                    tpm=tpm,
                    created_at=now(),
                )
            )
            session.commit()
        return key.text

    def revoke(self, name: str) -> None:
        with Session(self.engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == name))
            if row is None:
                raise KeyNameError(f"no key is named {name!r}")
            row.revoked_at = row.revoked_at or now()
            session.commit()

    def list(self) -> list[dict[str, object]]:
        """Every key's name, limits and times (never a key or its hash)."""
        with Session(self.engine) as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
            return [
                {
                    "name": row.name,
                    "models": json.loads(row.models) if row.models else None,
                    "rpm": row.rpm,
                    "tpm": row.tpm,
                    "created_at": row.created_at.isoformat(),
                    "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
                    "revoked": row.revoked_at is not None,
                }
                for row in rows
            ]

    def verify(self, text: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for anything else."""
        parts = split_key(text)
        if parts is None:
            return None
        lookup, secret = parts
        with Session(self.engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.lookup == lookup))
            if row is None or row.revoked_at is not None or not matches(secret, row.digest):
                return None
            used = aware(row.last_used_at)
            if used is None or now() - used > TOUCH_EVERY:
                row.last_used_at = now()
                session.commit()
            models = tuple(json.loads(row.models)) if row.models else None
            return Principal("key", row.name, models, row.rpm, row.tpm)
