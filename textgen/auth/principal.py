"""Who a request comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Principal:
    """An API key or a user: its name (never a secret) and what it may do."""

    kind: Literal["key", "user"]
    name: str
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None  # None: the server's default limit
    tpm: int | None
    admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def ident(self) -> str:
        """The name rate limits, logs and metrics know it by (keys and users apart)."""
        return f"{self.kind}:{self.name}"
