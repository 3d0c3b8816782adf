"""Drafts from a sequence's own text (prompt lookup): what NgramDraft proposes."""

from __future__ import annotations

from textgen.engine.draft import NgramDraft


def drafts(prompt: list[int], generated: list[int] | None = None) -> NgramDraft:
    draft = NgramDraft()
    draft.sync(prompt, generated or [])
    return draft


def test_proposes_what_followed_the_last_tokens_before() -> None:
    # The last three tokens (7 8 9) occurred before, followed by 1 2 3 4.
    draft = drafts([5, 7, 8, 9, 1, 2, 3, 4, 6, 7, 8, 9])
    assert draft.propose(3) == [1, 2, 3]
    assert draft.propose(10) == [1, 2, 3, 4, 6, 7, 8, 9]  # up to the end of the text
    assert draft.propose(0) == []


def test_longer_match_wins_then_latest_occurrence() -> None:
    # "8 9" occurred twice (followed by 1, then by 2); "7 8 9" once, followed by 1.
    assert drafts([7, 8, 9, 1, 0, 8, 9, 2, 0, 7, 8, 9]).propose(1) == [1]
    # Without a three-token match the latest two-token one counts.
    assert drafts([3, 8, 9, 1, 4, 8, 9, 2, 5, 8, 9]).propose(2) == [2, 5]


def test_nothing_when_the_tail_never_occurred() -> None:
    assert drafts([1, 2, 3, 4, 5, 6]).propose(4) == []
    assert drafts([1]).propose(4) == []
    assert drafts([]).propose(4) == []
    # A single repeated token is not enough (pairs and triples only).
    assert drafts([4, 1, 2, 4]).propose(4) == []


def test_sync_takes_only_new_tokens_across_prompt_and_output() -> None:
    draft = NgramDraft()
    generated: list[int] = []
    draft.sync([1, 2, 3], generated)
    assert draft.propose(2) == []
    for token in [9, 1, 2]:
        generated.append(token)
        draft.sync([1, 2, 3], generated)
    assert draft.tokens == [1, 2, 3, 9, 1, 2]
    assert draft.propose(2) == [3, 9]
    assert draft.propose(4) == [3, 9, 1, 2]
