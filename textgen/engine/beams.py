"""Beam search one step at a time, so its beams decode as rows of the running batch.

The arithmetic is transformers' ``_beam_search`` (5.x) for one prompt: log-softmax, the
processors over log-probabilities, the top ``max(2, 1 + eos tokens) x beams`` continuations,
finished hypotheses scored by length, its early-stop heuristic. A prompt starts as one row; the
first step expands it to ``num_beams`` rows (transformers starts with copies whose scores are
-1e9, which amounts to the same candidates). Tests compare the outputs with ``generate()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from textgen.generation.finish import FinishReason, StoppingCriteria, beam_reason
from textgen.generation.strategies import GenerationParams

# transformers' stand-in for minus infinity in beam scores.
EXCLUDED = -1.0e9


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: its generated tokens and their length-normalised score."""

    tokens: tuple[int, ...]
    score: float
    finished: bool


@dataclass
class BeamStep:
    """What one step decided: per new beam, the beam it continues and its token."""

    parents: list[int]
    tokens: list[int]


@dataclass
class BeamSearch:
    """The beams of one prompt of one request."""

    prompt: list[int]
    params: GenerationParams
    criteria: StoppingCriteria
    decode: Callable[[list[int]], str]
    length_penalty: float = 1.0
    beams: list[list[int]] = field(default_factory=lambda: [[]])  # generated tokens per beam
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    hypotheses: list[Hypothesis] = field(default_factory=list)
    improvable: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        self.width = self.params.num_beams
        self.eos = self.criteria.eos
        self.processors = LogitsProcessorList()
        if self.params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(self.params.repetition_penalty))
        if self.params.no_repeat_ngram_size > 0:
            self.processors.append(NoRepeatNGramLogitsProcessor(self.params.no_repeat_ngram_size))
        self.hypotheses = [Hypothesis((), EXCLUDED, False) for _ in range(self.width)]
        # A token holds at least one byte and a character at most four, so a stop string of n
        # characters lies within the last 4n tokens.
        longest = max((len(stop) for stop in self.params.stop), default=0)
        self.stop_window = 4 * longest + 4

    @property
    def generated(self) -> int:
        return len(self.beams[0])

    def step(self, logits: torch.Tensor, interrupted: bool = False) -> BeamStep:
        """Choose the next beams from the current beams' logits [beams, vocabulary].

        ``interrupted`` (deadline passed): every continuation counts as finished, as
        transformers' stopping criteria make it, so the search ends with what it has.
        """
        rows, vocab = logits.shape
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if self.processors:
            history = torch.tensor([self.prompt + beam for beam in self.beams], dtype=torch.long)
            log_probs = self.processors(history, log_probs)  # type: ignore[arg-type]
        totals = (log_probs + self.scores[:, None]).reshape(-1)
        keep = min(max(2, 1 + len(self.eos)) * self.width, totals.numel())
        top_scores, top_index = torch.topk(totals, keep)
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        candidates = [self.beams[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        hits = torch.tensor([interrupted or self.ends(c) for c in candidates])

        # The beams that go on: the best continuations that did not just finish.
        running = top_scores + hits.float() * EXCLUDED
        chosen = torch.topk(running, min(self.width, keep)).indices.tolist()
        self.update_hypotheses(candidates, top_scores, hits)
        self.beams = [candidates[j] for j in chosen]
        self.scores = running[chosen]
        self.check_improvable()
        self.done = (
            not self.improvable or all(h.finished for h in self.hypotheses) or bool(hits.all())
        )
        return BeamStep([parents[j] for j in chosen], [tokens[j] for j in chosen])

    def ends(self, tokens: list[int]) -> bool:
        """Whether a continuation is finished: end of sequence, budget, or a stop string (in
        the text of its last tokens, as transformers' stop-string criteria look)."""
        tail = self.decode(tokens[-self.stop_window :]) if self.params.stop else ""
        return self.criteria.after(tokens[-1], tail, len(tokens), False) is not None

    def update_hypotheses(
        self, candidates: list[list[int]], scores: torch.Tensor, hits: torch.Tensor
    ) -> None:
        """Keep the best ``width`` finished hypotheses, old and new (only the first ``width``
        continuations may finish; the others exist so enough beams go on)."""
        top = torch.zeros_like(hits)
        top[: self.width] = True
        just_finished = hits & top
        normalised = scores / (len(candidates[0]) ** self.length_penalty)
        if all(h.finished for h in self.hypotheses):  # early_stopping=True: full means done
            normalised = normalised + EXCLUDED
        if not self.improvable:
            normalised = normalised + EXCLUDED
        normalised = normalised + (~just_finished).float() * EXCLUDED
        merged = self.hypotheses + [
            Hypothesis(tuple(c), float(s), bool(f))
            for c, s, f in zip(candidates, normalised.tolist(), just_finished.tolist(), strict=True)
        ]
        merged_scores = torch.tensor([h.score for h in merged])
        best = torch.topk(merged_scores, self.width).indices.tolist()
        self.hypotheses = [merged[i] for i in best]

    def check_improvable(self) -> None:
        """transformers' early-stop heuristic (early_stopping=True): can the best running beam
        still beat the worst finished hypothesis?"""
        best_possible = float(self.scores[0]) / (self.generated**self.length_penalty)
        if all(h.finished for h in self.hypotheses):
            worst = min(h.score for h in self.hypotheses)
        else:
            worst = EXCLUDED
        self.improvable = self.improvable and best_possible > worst

    def outputs(self, interrupted: bool = False) -> list[tuple[str, FinishReason, int]]:
        """The best ``num_return_sequences`` hypotheses: text, finish reason, token count."""
        ranked = [h for h in self.hypotheses if h.finished]
        ranked += [Hypothesis(tuple(b), EXCLUDED, False) for b in self.beams]
        out = []
        for hypothesis in ranked[: self.params.num_return_sequences]:
            tokens = list(hypothesis.tokens)
            ended = bool(tokens) and tokens[-1] in self.eos
            text = self.decode(tokens[:-1] if ended else tokens)
            text, stopped = self.criteria.stops.truncate(text)
            out.append((text, beam_reason(stopped, ended, interrupted), len(tokens)))
        return out
