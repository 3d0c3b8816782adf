"""The database API keys and users are kept in (SQLite under the data directory by default, any
SQLAlchemy URL), its schema kept by Alembic migrations."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import DeclarativeBase

MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    pass


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(moment: dt.datetime | None) -> dt.datetime | None:
    """A stored time with its zone (SQLite keeps none; every time stored is UTC)."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment


def migrate(url: str) -> None:
    """Bring the database's schema to the latest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def connect(url: str) -> Engine:
    """The migrated database."""
    migrate(url)
    # pool_pre_ping: a connection the database closed meanwhile (a restart) is replaced.
    return create_engine(url, pool_pre_ping=True)
