"""Prompts on their way into the batch: computed a chunk of columns at a time, so that a long
prompt (or one whose every position's logprobs are wanted) neither stalls the running rows for
the whole prompt nor holds the logits of every position at once."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from textgen.engine.compiled import CompiledForward
from textgen.engine.decode import DecodeStep
from textgen.engine.kvcache import BatchCache
from textgen.engine.logprobs import following_logprobs
from textgen.engine.prefix import LayerKV, PrefixCache
from textgen.engine.recorder import Recorder
from textgen.engine.sequence import Row

log = logging.getLogger(__name__)

# An echoed prompt's chunk keeps every position's logits (rows x columns x vocabulary floats):
# at most this many positions per chunk, 25 MB for a 49k vocabulary.
ECHO_CHUNK_TOKENS = 128
# While rows are decoding, a prefill chunk is sized to take about this long (and at least
# MIN_CHUNK_TOKENS): the time it adds between their tokens.
SHARED_CHUNK_S = 0.05
MIN_CHUNK_TOKENS = 4


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


class Prefills:
    """The prefills under way. They take turns, a chunk each (so a short prompt is not stuck
    behind a long one), and chunks are sized by the prefill speed measured on recent ones."""

    def __init__(
        self,
        forward: DecodeStep | CompiledForward,
        transformers: DecodeStep,
        prefixes: PrefixCache | None,
        pad_token_id: int,
        record: Recorder,
        chunk_tokens: int,
    ) -> None:
        self.forward = forward  # the compiled decoder when the model has one
        self.transformers = transformers  # for prompts whose every position's logits are wanted
        self.prefixes = prefixes
        self.pad_token_id = pad_token_id
        self.record = record
        self.chunk_tokens = chunk_tokens
        self.speed: float | None = None  # prompt tokens a second, recent chunks
        self.jobs: deque[Prefill] = deque()

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def rows(self) -> Iterator[Row]:
        """Every row being prefilled."""
        return (row for job in self.jobs for row in job.rows)

    def clear(self) -> list[Row]:
        """Drop every prefill; their rows."""
        rows = list(self.rows())
        self.jobs.clear()
        return rows

    def start(self, rows: list[Row]) -> None:
        """Queue new rows: prompts whose start is in the prefix cache compute only the rest,
        together; the others together, whole."""
        fresh, continuing, hits = [], [], []
        for row in rows:
            # Echoed prompts want logprobs for every prompt position, so run whole.
            hit = None
            if self.prefixes is not None and not row.handle.job.params.prompt_logprobs:
                hit = self.prefixes.match(row.prompt)
            if hit is None:
                fresh.append(row)
            else:
                continuing.append(row)
                hits.append(hit)
        pad = self.pad_token_id
        if fresh:
            self.jobs.append(Prefill.build(fresh, [0] * len(fresh), [], pad))
        if continuing:
            kept = [kv for _, kv in hits]
            self.jobs.append(Prefill.build(continuing, [n for n, _ in hits], kept, pad))

    def next(self, decoding: bool, departed: list[Row]) -> tuple[Prefill, torch.Tensor] | None:
        """One chunk of the prefill whose turn it is; when that completes it, the prefill and
        the logits of its rows' last positions. Rows that leave go to ``departed``.

        A failure stays with the requests in that prefill: one request's prefill that fails
        fails it alone; several together are tried again one request at a time.
        """
        job = self.jobs.popleft()
        if all(row.handle.abandoned for row in job.rows):
            departed.extend(job.rows)
            return None
        try:
            logits = self.run_chunk(job, self.chunk_budget(decoding))
        except Exception as exc:
            handles = {row.handle for row in job.rows}
            if len(handles) > 1:
                log.warning("a prefill of %d requests failed; retrying each alone", len(handles))
                self.jobs.extendleft(reversed(job.split(self.pad_token_id)))
                return None
            log.exception("a prefill failed")
            job.rows[0].handle.fail_with(exc)
            departed.extend(job.rows)
            return None
        if not job.complete:
            self.jobs.append(job)
            return None
        self.finish(job)
        return job, logits

    def chunk_budget(self, decoding: bool) -> int:
        """Prompt tokens for the next chunk: ``chunk_tokens`` while no row is decoding; while
        rows are, as many as take about SHARED_CHUNK_S at the measured speed, so that a long
        prompt adds at most that to their time between tokens."""
        if not decoding or self.speed is None:
            return self.chunk_tokens
        fitting = int(self.speed * SHARED_CHUNK_S)
        return max(MIN_CHUNK_TOKENS, min(self.chunk_tokens, fitting))

    def run_chunk(self, job: Prefill, budget: int) -> torch.Tensor:
        """Compute the job's next columns, about ``budget`` tokens; the logits of its last
        position [rows, vocab]."""
        started = time.perf_counter()
        start, end = job.next_columns(budget)
        ids, positions = job.ids[:, start:end], job.positions[:, start:end]
        mask = job.mask[:, : job.past + end]
        if job.echo:
            every = self.transformers.forward(ids, positions, mask, job.cache, logits_to_keep=0)
            job.record_logprobs(every, start)
            logits = every[:, -1, :]
        else:
            logits = self.forward(ids, positions, mask, job.cache)
        job.done = end
        speed = ids.numel() / max(time.perf_counter() - started, 1e-6)
        # Later chunks attend over more columns, so the speed is followed, not averaged.
        self.speed = speed if self.speed is None else 0.5 * self.speed + 0.5 * speed
        return logits

    def finish(self, job: Prefill) -> None:
        """Count a complete prefill's reused tokens and keep its prompts for reuse."""
        if job.past:
            self.record.cached(sum(job.reused))
            for row, n in zip(job.rows, job.reused, strict=True):
                row.handle.cached_tokens[row.prompt_index] = n
        if self.prefixes is not None:
            past, new = job.past, job.width
            for number, (row, n) in enumerate(zip(job.rows, job.reused, strict=True)):
                r = len(row.prompt) - n
                # The kept columns, then the computed ones (the gap between is padding).
                columns = torch.cat(
                    [torch.arange(past - n, past), torch.arange(past + new - r, past + new)]
                )
                self.prefixes.store(row.prompt, partial(job.cache.copy_row, number, columns))
