"""Guessing a sequence's next tokens from its own text (prompt lookup decoding).

When the last few tokens occurred before, in the prompt or the output, the tokens that followed
them then are a likely continuation now (quotes, names, code, lists, repeated phrases). A greedy
row can check such a draft in one step of the model: every guessed token the model chooses
there is kept, so the output is the greedy output, found in fewer steps (up to the last bits of
the logits: several positions computed together round differently from one at a time, which
can turn a near tie; README, "Drafts").
"""

from __future__ import annotations

# The n-gram sizes looked up, longest first: a longer match predicts better. One token alone
# proposed too many wrong drafts on the benchmark's stories (their checking is not free).
SIZES = (3, 2)


class NgramDraft:
    """The tokens of one sequence, indexed by each n-gram's latest occurrence that has a
    follower."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it

    def sync(self, prompt: list[int], generated: list[int]) -> None:
        """Take in the tokens of ``prompt + generated`` not seen yet (they only ever grow)."""
        known = len(self.tokens)
        fresh = prompt[known:] + generated[max(0, known - len(prompt)) :]
        for token in fresh:
            end = len(self.tokens)
            for size in SIZES:
                if end >= size:
                    self._after[tuple(self.tokens[end - size :])] = end
            self.tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the last n
        tokens (the longest n that occurred before), or none."""
        if limit < 1:
            return []
        for size in SIZES:
            if len(self.tokens) < size:
                continue
            start = self._after.get(tuple(self.tokens[-size:]))
            if start is not None:
                return self.tokens[start : start + limit]
        return []
