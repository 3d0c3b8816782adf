"""Why an output ends: one pure place, tested without a model."""

from __future__ import annotations

import pytest

from textgen.generation.finish import FinishReason, StoppingCriteria, beam_reason, settled
from textgen.generation.stopping import StopSequenceMatcher

EOS = 2


def criteria(budget: int = 5, stops: tuple[str, ...] = ("###",)) -> StoppingCriteria:
    return StoppingCriteria(frozenset({EOS}), budget, StopSequenceMatcher(stops))


@pytest.mark.parametrize(
    ("token", "text", "generated", "expired", "reason"),
    [
        (7, "hello", 1, False, None),
        (EOS, "hello ###", 5, True, FinishReason.EOS),  # the model's end wins over everything
        (7, "hello ###", 5, True, FinishReason.STOP),  # then a stop string
        (7, "hello", 5, True, FinishReason.LENGTH),  # then the budget
        (7, "hello", 2, True, FinishReason.TIME_LIMIT),  # then the deadline
        (7, "hello ##", 4, False, None),  # half a stop string is not one
    ],
)
def test_after_a_token(
    token: int, text: str, generated: int, expired: bool, reason: FinishReason | None
) -> None:
    assert criteria().after(token, text, generated, expired) is reason


def test_a_stop_string_in_the_final_text_wins() -> None:
    assert settled(FinishReason.LENGTH, stopped=True) is FinishReason.STOP
    assert settled(FinishReason.TIME_LIMIT, stopped=False) is FinishReason.TIME_LIMIT


@pytest.mark.parametrize(
    ("stopped", "ended", "interrupted", "reason"),
    [
        (True, True, True, FinishReason.STOP),
        (False, True, True, FinishReason.EOS),
        (False, False, True, FinishReason.TIME_LIMIT),
        (False, False, False, FinishReason.LENGTH),
    ],
)
def test_beam_hypotheses(
    stopped: bool, ended: bool, interrupted: bool, reason: FinishReason
) -> None:
    assert beam_reason(stopped, ended, interrupted) is reason


def test_openai_names() -> None:
    assert FinishReason.EOS.openai == FinishReason.STOP.openai == "stop"
    assert FinishReason.LENGTH.openai == "length"


def test_a_loop_is_found_at_the_end_only() -> None:
    from textgen.generation.finish import LONGEST_LOOP, looping

    assert looping([1, 2, 3, 9, 8, 9, 8, 9, 8], 3)  # "9 8" three times
    assert not looping([9, 8, 9, 8, 9, 8, 1], 3)  # the loop is over
    assert not looping([9, 8, 9, 8], 3)
    assert looping([5] * 4, 4) and not looping([5] * 3, 4)
    block = list(range(LONGEST_LOOP))
    assert looping(block * 2, 2)
    assert not looping(list(range(LONGEST_LOOP + 1)) * 2, 2)  # longer than looked for
    criteria = StoppingCriteria(frozenset({EOS}), 100, StopSequenceMatcher(()), repeats=2)
    assert criteria.after(7, "x", 4, False, [7, 6, 7, 6]) is FinishReason.REPETITION
    assert criteria.after(EOS, "x", 4, False, [6, EOS, 6, EOS]) is FinishReason.EOS
