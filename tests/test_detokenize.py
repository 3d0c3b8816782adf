"""Incremental detokenization, with a byte-level fake tokenizer (no model)."""

from __future__ import annotations

from textgen.engine.detokenize import IncrementalDetokenizer


def byte_decode(ids: list[int]) -> str:
    """Tokens are single bytes, as in byte-level BPE at its worst."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_come_out_whole() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    deltas = [detok.push(b) for b in "a日🙂b".encode()]
    assert [d for d in deltas if d] == ["a", "日", "🙂", "b"]
    assert detok.text == "a日🙂b"


def test_flush_gives_an_unfinished_character_at_the_end() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    for b in b"x" + "日".encode()[:2]:
        detok.push(b)
    assert detok.text == "x"
    assert detok.flush() == "\ufffd"


def test_context_dependent_spacing() -> None:
    words = {1: "Hello", 2: "world", 3: "!"}

    def decode(ids: list[int]) -> str:
        # Like sentencepiece: a word after another word gets a space.
        out = ""
        for i in ids:
            out += ("" if not out or words[i] == "!" else " ") + words[i]
        return out

    detok = IncrementalDetokenizer(decode)
    assert [detok.push(i) for i in (1, 2, 3)] == ["Hello", " world", "!"]
