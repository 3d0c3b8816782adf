"""Log-probabilities of chosen and prompt tokens under the model's own distribution."""

from __future__ import annotations

import torch

from textgen.engine.sequence import Sequence, TokenLogprob


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """A token's log-probability under the model's own distribution, and the ``top`` likeliest."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)


def record_prompt_logprobs(sequences: list[Sequence], logits: torch.Tensor, width: int) -> None:
    """Each prompt token's logprob given the tokens before it (the first has none)."""
    seen: set[tuple[int, int]] = set()
    for row, sequence in enumerate(sequences):
        handle = sequence.handle
        key = (id(handle), sequence.prompt_index)
        if not handle.job.params.prompt_logprobs or key in seen:
            continue
        seen.add(key)
        start = width - len(sequence.prompt)
        top = handle.job.params.logprobs or 0
        entries: list[TokenLogprob | None] = [None]
        for position in range(1, len(sequence.prompt)):
            token = sequence.prompt[position]
            entries.append(token_logprob(logits[row, start + position - 1], token, top))
        handle.prompt_logprobs[sequence.prompt_index] = entries
