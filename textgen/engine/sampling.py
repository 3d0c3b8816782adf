"""Choosing each sequence's next token with its own settings and random generator."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from textgen.generation.strategies import GenerationParams


class OccurrencePenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated so far."""

    def __init__(self, presence: float, frequency: float, prompt_length: int) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, self.prompt_length :]
        if generated.numel() == 0:
            return scores
        counts = torch.bincount(generated, minlength=scores.shape[-1]).to(scores.dtype)
        penalty = self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores - penalty[: scores.shape[-1]]  # type: ignore[return-value]


class LogitBias(LogitsProcessor):
    """Adds a fixed bias to chosen token ids (OpenAI's logit_bias)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.ids = torch.tensor([token for token, _ in bias], dtype=torch.long)
        self.values = torch.tensor([value for _, value in bias])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()  # type: ignore[assignment]
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class MinTokens(LogitsProcessor):
    """Forbids end-of-sequence tokens until ``minimum`` tokens have been generated."""

    def __init__(self, minimum: int, prompt_length: int, eos: frozenset[int]) -> None:
        self.until = prompt_length + minimum
        self.eos = torch.tensor(sorted(eos), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] >= self.until or self.eos.numel() == 0:
            return scores
        scores = scores.clone()  # type: ignore[assignment]
        scores[:, self.eos] = -float("inf")
        return scores


def stream_seed(seed: int, index: int) -> int:
    """The random stream of a request's index-th sequence: a hash, so that seed s's second
    sequence is unrelated to seed s+1's first (seed + index would make them equal)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def argmaxes(logits: torch.Tensor) -> list[int]:
    """Each row's highest-scoring token (logits [rows, vocabulary]): the first of equals and
    NaN above all, as torch.argmax. Through NumPy: torch's CPU argmax took 52 us for one
    49,152-token row and 404 us for 16 rows, NumPy's 5 and 62."""
    if logits.dtype == torch.bfloat16:  # NumPy has none; float32 holds each value exactly
        logits = logits.float()
    return list(logits.detach().numpy().argmax(axis=-1).tolist())


class TokenChooser:
    """Per-sequence token choice: greedy argmax, or transformers' processors then sampling."""

    def __init__(
        self,
        params: GenerationParams,
        index: int,
        prompt_length: int,
        eos: frozenset[int],
        grammar: Any = None,
        budget: int = 0,
    ) -> None:
        # The order follows transformers' generate(): penalties, then bias, then the warpers.
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(
                OccurrencePenalty(params.presence_penalty, params.frequency_penalty, prompt_length)
            )
        if params.min_tokens and eos:
            processors.append(MinTokens(params.min_tokens, prompt_length, eos))
        self.needs_history = bool(processors)
        if params.logit_bias:
            processors.append(LogitBias(params.logit_bias))
        # The grammar masks before the warpers, so top-p and friends see only allowed tokens.
        self.constraint = None
        if grammar is not None:
            from textgen.engine.grammar import GrammarConstraint

            self.constraint = GrammarConstraint(grammar, budget)
            processors.append(self.constraint)
        self.sample = params.do_sample
        self.generator: torch.Generator | None = None
        if params.do_sample:
            if params.temperature is not None and params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            if params.min_p:
                processors.append(MinPLogitsWarper(params.min_p))
            # Each of a request's n sequences draws from its own stream, so results depend
            # only on (seed, index), not on what else shares the batch.
            assert params.seed is not None
            self.generator = torch.Generator().manual_seed(stream_seed(params.seed, index))
        self.processors = processors

    def release(self) -> None:
        """Drop per-sequence state (the grammar matcher, its bitmask) once the output ends."""
        self.constraint = None
        self.processors = LogitsProcessorList()

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no processors: the batch can take one argmax over all such rows."""
        return not self.sample and not self.processors

    def choose(self, history: list[int], logits: torch.Tensor) -> int:
        """The next token given the sequence so far (prompt and output) and its logits [V]."""
        scores = logits.unsqueeze(0).float()
        if self.processors:
            ids = torch.tensor([history], dtype=torch.long) if self.needs_history else None
            scores = self.processors(ids, scores)  # type: ignore[arg-type]
        if not self.sample:
            (token,) = argmaxes(scores)
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.constraint is not None:
            self.constraint.accept(token)
        return token
