"""Choosing each sequence's next token with its own settings and random generator."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from textgen.generation.strategies import GenerationParams


class TokenChooser:
    """Per-sequence token choice: greedy argmax, or transformers' processors then sampling."""

    def __init__(self, params: GenerationParams, index: int) -> None:
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        self.needs_history = bool(processors)
        self.sample = params.do_sample
        self.generator: torch.Generator | None = None
        if params.do_sample:
            if params.temperature is not None and params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            # Each of a request's n sequences draws from its own stream, so results depend
            # only on (seed, index), not on what else shares the batch.
            assert params.seed is not None
            self.generator = torch.Generator().manual_seed((params.seed + index) % 2**63)
        self.processors = processors

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
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
