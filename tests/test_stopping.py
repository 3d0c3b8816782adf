"""Stop strings, without a model."""

from __future__ import annotations

from textgen.generation.stopping import StopSequenceMatcher


def test_truncates_before_earliest_stop() -> None:
    matcher = StopSequenceMatcher(("END", "\n\n"))
    assert matcher.truncate("one\n\ntwo END") == ("one", True)


def test_no_stop_keeps_text() -> None:
    assert StopSequenceMatcher(("zzz",)).truncate("abc") == ("abc", False)
    assert StopSequenceMatcher(()).truncate("abc") == ("abc", False)


def test_stop_at_start_gives_empty_text() -> None:
    assert StopSequenceMatcher(("ab",)).truncate("abc") == ("", True)


def test_holdback_keeps_a_possible_stop_prefix() -> None:
    matcher = StopSequenceMatcher(("</end>", "STOP"))
    assert matcher.holdback("text </e") == 3
    assert matcher.holdback("text ST") == 2
    assert matcher.holdback("text") == 0
    assert matcher.holdback("text S") == 1
