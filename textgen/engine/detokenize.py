"""UTF-8-safe incremental detokenization (pure: takes any decode function)."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Decoding the tail from a token before the last emitted one keeps context-dependent
    spacing right (sentencepiece), and a tail ending in U+FFFD is an incomplete UTF-8
    sequence whose remaining bytes are still to come, so it waits.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def push(self, token: int) -> str:
        """Add a token; return the text it completes (possibly empty)."""
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix_offset : self.read_offset])
        after = self.decode(self.tokens[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            delta = after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever the full decode holds beyond what was emitted."""
        full = self.decode(self.tokens)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
