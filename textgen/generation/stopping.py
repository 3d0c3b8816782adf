"""Stop strings: where generated text must end (pure)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopSequenceMatcher:
    """Finds the earliest stop string in generated text."""

    stops: tuple[str, ...]

    def find(self, text: str) -> int | None:
        """Index where the earliest stop string begins, or None."""
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(hits) if hits else None

    def truncate(self, text: str) -> tuple[str, bool]:
        """Text cut just before the first stop string, and whether one was found."""
        index = self.find(text)
        return (text, False) if index is None else (text[:index], True)
