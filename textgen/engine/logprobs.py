"""Log-probabilities of chosen and prompt tokens under the model's own distribution."""

from __future__ import annotations

import torch

from textgen.engine.events import TokenLogprob


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """A token's log-probability under the model's own distribution, and the ``top`` likeliest."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)


def following_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each of ``tokens``' logprob under the logits of the position before it ([n, vocab], one
    row per token), and the ``top`` likeliest there: all rows at once."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(tokens, dtype=torch.long)
    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen, strict=True)]
    values, ids = logprobs.topk(top, dim=-1)
    return [
        TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
        for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)
    ]
