"""Prompts on their way into the batch: computed a chunk of columns at a time, so that a long
prompt (or one whose every position's logprobs are wanted) neither stalls the running rows for
the whole prompt nor holds the logits of every position at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen.engine.kvcache import BatchCache
from textgen.engine.logprobs import following_logprobs
from textgen.engine.prefix import LayerKV
from textgen.engine.sequence import Row

# An echoed prompt's chunk keeps every position's logits (rows x columns x vocabulary floats):
# at most this many positions per chunk, 25 MB for a 49k vocabulary.
ECHO_CHUNK_TOKENS = 128


@dataclass
class Prefill:
    """Rows prefilled together: each prompt's tokens after its ``reused`` first ones (whose
    keys and values ``kept`` holds), the kept columns right-aligned in ``past`` columns and the
    rest left-padded after them (with nothing kept: whole prompts, left-padded)."""

    rows: list[Row]
    reused: list[int]
    kept: list[LayerKV]
    cache: BatchCache
    ids: torch.Tensor  # [rows, new]
    positions: torch.Tensor  # [rows, new]
    mask: torch.Tensor  # [rows, past + new]: 1 where a row has a token
    past: int
    echo: bool  # some row wants its prompt's logprobs: every position's logits are kept
    done: int = 0  # new columns computed so far

    @classmethod
    def build(cls, rows: list[Row], reused: list[int], kept: list[LayerKV], pad: int) -> Prefill:
        rest = [len(row.prompt) - n for row, n in zip(rows, reused, strict=True)]
        past, new = max(reused), max(rest)
        cache = BatchCache.right_aligned(kept, reused, past, room=new) if past else BatchCache()
        parts = list(zip(rows, reused, rest, strict=True))
        ids = torch.tensor([[pad] * (new - r) + row.prompt[n:] for row, n, r in parts])
        mask = torch.tensor(
            [[0] * (past - n) + [1] * n + [0] * (new - r) + [1] * r for _, n, r in parts]
        )
        positions = torch.tensor([[0] * (new - r) + list(range(n, n + r)) for _, n, r in parts])
        echo = any(row.handle.job.params.prompt_logprobs for row in rows)
        for row in rows:
            if row.handle.job.params.prompt_logprobs:
                row.handle.prompt_logprobs[row.prompt_index] = [None]
        return cls(rows, reused, kept, cache, ids, positions, mask, past, echo)

    @property
    def width(self) -> int:
        """New columns in all."""
        return int(self.ids.shape[1])

    @property
    def complete(self) -> bool:
        return self.done >= self.width

    def next_columns(self, budget_tokens: int) -> tuple[int, int]:
        """The next chunk, new columns [start, end): about ``budget_tokens`` over the rows."""
        budget = min(budget_tokens, ECHO_CHUNK_TOKENS) if self.echo else budget_tokens
        columns = max(1, budget // len(self.rows))
        return self.done, min(self.width, self.done + columns)

    def split(self, pad: int) -> list[Prefill]:
        """The same rows as one prefill per request, started afresh (after a failure, so that
        the request that caused it fails alone)."""
        by_request: dict[int, list[int]] = {}
        for position, row in enumerate(self.rows):
            by_request.setdefault(id(row.handle), []).append(position)
        return [
            Prefill.build(
                [self.rows[i] for i in group],
                [self.reused[i] for i in group],
                [self.kept[i] for i in group] if self.past else [],
                pad,
            )
            for group in by_request.values()
        ]

    def record_logprobs(self, logits: torch.Tensor, start: int) -> None:
        """Prompt logprobs from the logits of new columns [start, start + n) ([rows, n, vocab]):
        the logits at a column give the next column's token's logprob. Echoed prompts are
        never continued from the prefix cache, so then past is 0."""
        seen: set[tuple[int, int]] = set()
        end = start + logits.shape[1]
        for row_number, row in enumerate(self.rows):
            handle = row.handle
            key = (id(handle), row.prompt_index)
            if not handle.job.params.prompt_logprobs or key in seen:
                continue
            seen.add(key)
            first = self.width - len(row.prompt)  # the prompt's first column
            low, high = max(start, first), min(end, first + len(row.prompt) - 1)
            if low >= high:
                continue
            targets = row.prompt[low - first + 1 : high - first + 1]
            top = handle.job.params.logprobs or 0
            chunk = logits[row_number, low - start : high - start]
            entries = following_logprobs(chunk, targets, top)
            handle.prompt_logprobs[row.prompt_index].extend(entries)
