"""Post-processing of an output's text, from the GPT-2 project textgen grew from: strip an
echoed prompt, drop repeated lines, cap the words. Applied delta by delta, so a stream stays a
stream: what cannot be decided yet (a line not yet ended, a start that may still turn out to
be the prompt) is held back, as stop strings are, and the whole text comes out the same as
when it is processed at once."""

from __future__ import annotations

import re
from dataclasses import dataclass

WORD = re.compile(r"\S+")
# The options, in the order they apply (and are named in ``changed``).
OPTIONS = ("strip_prompt", "drop_repeated_lines", "max_words")


@dataclass(frozen=True)
class PostProcessing:
    """The options a request chose (all off by default)."""

    strip_prompt: bool = False
    drop_repeated_lines: bool = False
    max_words: int | None = None

    @property
    def active(self) -> bool:
        return self.strip_prompt or self.drop_repeated_lines or self.max_words is not None


class TextFilter:
    """One output's text through the options: ``push`` each delta and send what it returns,
    ``finish`` at the end; ``changed`` names the options that changed the text."""

    def __init__(self, options: PostProcessing, prompt: str) -> None:
        self.options = options
        self.prompt = prompt.strip()
        self.raw = ""
        self.sent = ""
        self.noted: set[str] = set()

    @property
    def changed(self) -> list[str]:
        """The options that changed the text, in the order they apply (a stream may notice
        them in another order than the whole text)."""
        return [option for option in OPTIONS if option in self.noted]

    def push(self, delta: str) -> str:
        self.raw += delta
        return self._emit(final=False)

    def finish(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decided = self.process(self.raw, final)
        # Each step only ever adds to what it decided, so what was sent is a prefix.
        assert decided.startswith(self.sent), (decided, self.sent)
        new, self.sent = decided[len(self.sent) :], decided
        return new

    def process(self, text: str, final: bool) -> str:
        """The part of ``text`` that is decided (all of it once ``final``)."""
        if self.options.strip_prompt:
            text = self.without_prompt(text, final)
        if self.options.drop_repeated_lines:
            text = self.unrepeated(text, final)
        if self.options.max_words is not None:
            text = self.capped(text, self.options.max_words, final)
        return text

    def note(self, option: str) -> None:
        self.noted.add(option)

    def without_prompt(self, text: str, final: bool) -> str:
        """The text after an echo of the prompt at its start (leading spaces aside)."""
        if not self.prompt:
            return text
        start = text.lstrip()
        if start.startswith(self.prompt):
            self.note("strip_prompt")
            return start[len(self.prompt) :]
        if not final and self.prompt.startswith(start):
            return ""  # it may still become the prompt
        return text

    def unrepeated(self, text: str, final: bool) -> str:
        """The text with every line that repeats an earlier one removed (blank lines kept);
        a line not yet ended waits, unless ``final``."""
        lines = text.split("\n")
        ended, last = lines[:-1], lines[-1]
        seen: set[str] = set()
        kept: list[str] = []
        for line in ended:
            key = line.strip()
            if key and key in seen:
                self.note("drop_repeated_lines")
                continue
            seen.add(key)
            kept.append(line + "\n")
        if final and last:
            if last.strip() and last.strip() in seen:
                self.note("drop_repeated_lines")
            else:
                kept.append(last)
        return "".join(kept)

    def capped(self, text: str, limit: int, final: bool) -> str:
        """The text up to the end of its ``limit``-th word; until ``final``, the space after
        the last word waits (a word may follow it, and be one too many)."""
        words = list(WORD.finditer(text))
        if len(words) > limit:
            self.note("max_words")
            return text[: words[limit - 1].end()]
        if final:
            return text
        return text[: words[-1].end()] if words else ""


def processed(options: PostProcessing, prompt: str, text: str) -> tuple[str, list[str]]:
    """A whole text through the options: (text, the options that changed it)."""
    flt = TextFilter(options, prompt)
    out = flt.push(text) + flt.finish()
    return out, flt.changed
