"""The rows of the running batch: one output being generated, or one beam of a search."""

from __future__ import annotations

from dataclasses import dataclass, field

from textgen.engine.beams import BeamSearch
from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.engine.draft import NgramDraft
from textgen.engine.events import Delta, Finished, TokenLogprob
from textgen.engine.request import RequestHandle
from textgen.engine.sampling import TokenChooser
from textgen.generation.finish import FinishReason, StoppingCriteria, settled


@dataclass
class Row:
    """What the batch needs of a row: its request, prompt, next input and whether it ended."""

    handle: RequestHandle
    prompt_index: int
    prompt: list[int]
    next_input: int = -1
    finish_reason: FinishReason | None = None
    last_token_at: float | None = None

    @property
    def ended(self) -> bool:
        """Finished, or its request was cancelled or failed: the row leaves the batch."""
        return self.finish_reason is not None or self.handle.abandoned


@dataclass
class Sequence(Row):
    """One output: its tokens, text, stop rules and logprobs."""

    index: int = 0
    chooser: TokenChooser | None = None
    detokenizer: IncrementalDetokenizer | None = None
    criteria: StoppingCriteria | None = None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: int = 0  # how many of the last logprobs no Delta has carried yet
    drafts: NgramDraft | None = None  # its text indexed for drafts, once it has had one

    @property
    def budget(self) -> int:
        assert self.criteria is not None
        return self.criteria.budget

    @property
    def plain_greedy(self) -> bool:
        assert self.chooser is not None
        return self.chooser.is_plain_greedy

    def history(self) -> list[int]:
        return self.prompt + self.generated

    def accept(self, token: int, expired: bool, logprob: TokenLogprob | None = None) -> None:
        """Take the chosen token: emit the text that is now safe, or finish."""
        assert self.detokenizer is not None and self.criteria is not None
        self.next_input = token
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.unsent_logprobs += 1
        if token not in self.criteria.eos:
            self.detokenizer.push(token)
        text = self.detokenizer.text
        reason = self.criteria.after(token, text, len(self.generated), expired, self.generated)
        if reason is not None:
            self.finish(reason)
        else:
            self.emit_until(len(text) - self.criteria.stops.holdback(text))

    def emit_until(self, end: int) -> None:
        assert self.detokenizer is not None
        if end > self.emitted:
            text = self.detokenizer.text[self.emitted : end]
            self.emitted = end
            self.handle.post(Delta(self.prompt_index, self.index, text, self.take_logprobs()))

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs no Delta has carried yet."""
        count, self.unsent_logprobs = self.unsent_logprobs, 0
        return tuple(self.logprobs[len(self.logprobs) - count :]) if count else ()

    def finish(self, reason: FinishReason) -> None:
        """End the output: send what remains of its text (cut before any stop string)."""
        assert self.chooser is not None and self.detokenizer is not None
        assert self.criteria is not None
        self.chooser.release()
        self.detokenizer.flush()
        text, stopped = self.criteria.stops.truncate(self.detokenizer.text)
        self.finish_reason = settled(reason, stopped)
        self.emit_until(len(text))
        if self.unsent_logprobs:
            self.handle.post(Delta(self.prompt_index, self.index, "", self.take_logprobs()))
        self.handle.post(
            Finished(
                self.prompt_index,
                self.index,
                text,
                self.finish_reason,
                len(self.generated),
                tuple(self.logprobs),
            )
        )


@dataclass
class BeamRow(Row):
    """One beam of a prompt's beam search; the search decides its tokens."""

    search: BeamSearch | None = None

    @property
    def ended(self) -> bool:
        assert self.search is not None
        return self.search.done or self.handle.abandoned
