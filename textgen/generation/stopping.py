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

    def holdback(self, text: str) -> int:
        """How many trailing characters could still be the start of a stop string.

        A stream must keep these back: the next token may complete the stop string, and
        then they are not output.
        """
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
