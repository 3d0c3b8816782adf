"""The running batch: the sequences decoded together, their KV cache rows and attention mask."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from textgen.engine.compiled import CompiledForward
from textgen.engine.decode import DecodeStep, decode_step_for
from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.engine.draft import NgramDraft
from textgen.engine.kvcache import BatchCache, merge_masks
from textgen.engine.logprobs import record_prompt_logprobs, token_logprob
from textgen.engine.metrics import EngineMetrics
from textgen.engine.prefix import LayerKV, PrefixCache
from textgen.engine.sampling import TokenChooser
from textgen.engine.sequence import RequestHandle, Sequence, TokenLogprob
from textgen.generation.runner import ModelRunner
from textgen.generation.stopping import StopSequenceMatcher


def new_sequences(handle: RequestHandle, runner: ModelRunner) -> list[Sequence]:
    """One Sequence per output a request asks for (each prompt x num_return_sequences)."""
    loaded = runner.loaded
    params = handle.job.params
    assert params.max_new_tokens is not None

    def decode(ids: list[int]) -> str:
        return str(loaded.tokenizer.decode(ids, skip_special_tokens=True))

    eos = frozenset() if params.ignore_eos else frozenset(loaded.eos_token_ids)
    return [
        Sequence(
            handle=handle,
            prompt_index=prompt_index,
            index=index,
            prompt=prompt,
            chooser=TokenChooser(
                params, index, len(prompt), eos, handle.job.grammar, params.max_new_tokens
            ),
            detokenizer=IncrementalDetokenizer(decode),
            matcher=StopSequenceMatcher(params.stop),
            eos=eos,
            budget=params.max_new_tokens,
        )
        for prompt_index, prompt in enumerate(handle.job.encoded)
        for index in range(params.num_return_sequences)
    ]


class RunningBatch:
    """Rows of the batch, in the same order as the KV cache's and the mask's rows."""

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        metrics: EngineMetrics,
        prefixes: PrefixCache | None = None,
        program: Any = None,
        draft_tokens: int = 0,
    ) -> None:
        self.prefixes = prefixes
        # transformers' forward: prefills without a compiled decoder, and prompts whose every
        # position's logits are wanted.
        self.transformers = DecodeStep(model)
        # The compiled decoder, when the model has one, runs both prefills and decode steps.
        compiled = CompiledForward(model, program) if program is not None else None
        self.forward: DecodeStep | CompiledForward = compiled or self.transformers
        self.decode: DecodeStep | CompiledForward = compiled or decode_step_for(model)
        # A lone greedy row checks up to this many tokens guessed from its text per step (the
        # compiled decoder does a few tokens of one row in little more than the time of one).
        self.draft_tokens = draft_tokens if compiled is not None else 0
        self.pad_token_id = pad_token_id
        self.metrics = metrics
        self.sequences: list[Sequence] = []
        self.cache: BatchCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token

    def __len__(self) -> int:
        return len(self.sequences)

    def clear(self) -> None:
        self.sequences, self.cache, self.mask = [], None, None

    def add(self, sequences: list[Sequence]) -> None:
        """Run the new prompts, then add them to the batch: prompts whose start is in the
        prefix cache compute only the rest, together; the others run together, whole."""
        fresh, continuing, hits = [], [], []
        for sequence in sequences:
            # Echoed prompts want logprobs for every prompt position, so run whole.
            hit = None
            if self.prefixes is not None and not sequence.handle.job.params.prompt_logprobs:
                hit = self.prefixes.match(sequence.prompt)
            if hit is None:
                fresh.append(sequence)
            else:
                continuing.append(sequence)
                hits.append(hit)
        if fresh:
            self.prefill(fresh, [0] * len(fresh), [])
        if continuing:
            self.prefill(continuing, [n for n, _ in hits], [kv for _, kv in hits])

    def prefill(self, sequences: list[Sequence], reused: list[int], kept: list[LayerKV]) -> None:
        """Run each prompt's tokens after its ``reused`` first ones, whose keys and values
        ``kept`` holds, all in one call: the kept columns right-aligned in ``past`` columns, the
        rest left-padded after them (with nothing kept: whole prompts, left-padded)."""
        rest = [len(s.prompt) - n for s, n in zip(sequences, reused, strict=True)]
        past, new = max(reused), max(rest)
        cache = BatchCache.right_aligned(kept, reused, past, room=new) if past else BatchCache()
        rows = list(zip(sequences, reused, rest, strict=True))
        pad = self.pad_token_id
        ids = torch.tensor([[pad] * (new - r) + s.prompt[n:] for s, n, r in rows])
        mask = torch.tensor(
            [[0] * (past - n) + [1] * n + [0] * (new - r) + [1] * r for _, n, r in rows]
        )
        positions = torch.tensor([[0] * (new - r) + list(range(n, n + r)) for _, n, r in rows])
        # Logits for every prompt position only when a request wants its prompt's logprobs
        # (such prompts are never continued, so then past is 0 and the logits cover them).
        echo = any(s.handle.job.params.prompt_logprobs for s in sequences)
        if echo:
            every = self.transformers.forward(ids, positions, mask, cache, logits_to_keep=0)
            record_prompt_logprobs(sequences, every, new)
            logits = every[:, -1, :]
        else:
            logits = self.forward(ids, positions, mask, cache)
        if past:
            self.metrics.count("prompt_tokens_cached", sum(reused))
            for sequence, n in zip(sequences, reused, strict=True):
                sequence.handle.cached_tokens[sequence.prompt_index] = n
        if self.prefixes is not None:
            for row, (sequence, n, r) in enumerate(rows):
                # The kept columns, then the computed ones (the gap between is padding).
                columns = torch.cat(
                    [torch.arange(past - n, past), torch.arange(past + new - r, past + new)]
                )
                self.prefixes.store(sequence.prompt, partial(cache.copy_row, row, columns))
        self.join(sequences, cache, mask, logits)

    def join(
        self,
        sequences: list[Sequence],
        cache: BatchCache,
        mask: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        """Add prefilled rows below the running ones, and choose their first tokens."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            self.cache.extend(cache)
            self.mask = merge_masks(self.mask, mask)
        self.sequences.extend(sequences)
        self.advance(sequences, logits)

    def step(self) -> None:
        """One decode step for every row; a lone greedy row may check a draft in it."""
        assert self.cache is not None and self.mask is not None
        started = time.perf_counter()
        rows = len(self.sequences)
        draft = self.draft_for(self.sequences[0]) if rows == 1 else []
        if draft:
            tokens = self.check_draft(self.sequences[0], draft)
        else:
            ids = torch.tensor([[s.next_input] for s in self.sequences])
            positions = self.grow(1)
            self.advance(self.sequences, self.decode(ids, positions, self.mask, self.cache))
            tokens = rows
        self.metrics.step(rows, tokens, time.perf_counter() - started)

    def grow(self, count: int) -> torch.Tensor:
        """Give every row ``count`` new columns in the mask; the positions of the new tokens
        [rows, count] (each row's position continues from its own unpadded length)."""
        assert self.mask is not None
        positions = self.mask.sum(-1, keepdim=True) + torch.arange(count)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], count)], dim=1)
        return positions

    def draft_for(self, sequence: Sequence) -> list[int]:
        """The tokens guessed to follow ``sequence`` (none unless it is plain greedy without
        logprobs, has a compiled decoder, and may take more than one token)."""
        room = min(self.draft_tokens, sequence.budget - len(sequence.generated) - 1)
        logprobs = sequence.handle.job.params.logprobs
        if room < 1 or not sequence.chooser.is_plain_greedy or logprobs is not None:
            return []
        if sequence.drafts is None:
            sequence.drafts = NgramDraft()
        sequence.drafts.sync(sequence.prompt, sequence.generated)
        return sequence.drafts.propose(room)

    def check_draft(self, sequence: Sequence, draft: list[int]) -> int:
        """Run the row's next input and the draft in one call, keep the tokens the model
        chooses up to the first guess it does not (and that choice), and drop the cache
        columns of the rest. Returns how many tokens the row took."""
        assert self.cache is not None and self.mask is not None
        assert isinstance(self.decode, CompiledForward)
        start = self.mask.shape[1]
        count = len(draft) + 1
        ids = torch.tensor([[sequence.next_input, *draft]])
        positions = self.grow(count)
        picks = self.decode.every(ids, positions, self.mask, self.cache)[0].argmax(-1).tolist()
        self.metrics.count("draft_tokens", len(draft))
        now = time.perf_counter()
        taken = 0
        for index, token in enumerate(picks):
            self.take(sequence, token, None, now)
            taken += 1
            if sequence.finish_reason is not None or index == len(draft) or token != draft[index]:
                break
        self.metrics.count("draft_tokens_accepted", taken - 1)
        # The columns of the inputs whose next token was taken: the one before the draft and
        # the guesses that proved right.
        self.cache.truncate(start + taken)
        self.mask = self.mask[:, : start + taken]
        return taken

    def advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each sequence's next token (one argmax for all plain-greedy rows)."""
        now = time.perf_counter()
        greedy = [i for i, s in enumerate(sequences) if s.chooser.is_plain_greedy]
        choices: dict[int, int] = {}
        if greedy:
            rows = logits if len(greedy) == len(sequences) else logits[greedy]  # no copy if all
            picks = rows.argmax(dim=-1).tolist()
            choices = dict(zip(greedy, picks, strict=True))
        for row, sequence in enumerate(sequences):
            token = choices.get(row)
            if token is None:
                token = sequence.chooser.choose(sequence.history(), logits[row])
            wanted = sequence.handle.job.params.logprobs
            logprob = None if wanted is None else token_logprob(logits[row], token, wanted)
            self.take(sequence, token, logprob, now)

    def take(
        self, sequence: Sequence, token: int, logprob: TokenLogprob | None, now: float
    ) -> None:
        """Give ``sequence`` its next token, chosen at ``now``."""
        handle = sequence.handle
        if handle.first_token is None:
            handle.first_token = now
            self.metrics.observe("time_to_first_token_s", now - handle.created)
        if sequence.last_token_at is not None:
            self.metrics.observe("inter_token_s", now - sequence.last_token_at)
        sequence.last_token_at = now
        sequence.accept(token, logprob)
        handle.generated += 1
        if sequence.finish_reason is None and now > handle.deadline:
            sequence.finish("time_limit")

    def remember_finished(self, row: int, sequence: Sequence) -> None:
        """Keep a finished row's prompt and output (all but the last token, which was chosen
        but never run) for reuse: the next turn of a chat starts with them."""
        assert self.prefixes is not None and self.cache is not None and self.mask is not None
        columns = self.mask[row].nonzero().flatten()
        tokens = sequence.prompt + sequence.generated[:-1]
        if len(columns) == len(tokens):
            self.prefixes.store(tokens, partial(self.cache.copy_row, row, columns))

    def evict(self) -> list[Sequence]:
        """Remove finished and cancelled rows (returned); drop cache columns no row needs."""
        assert self.cache is not None and self.mask is not None
        keep, gone = [], []
        for row, sequence in enumerate(self.sequences):
            if sequence.handle.cancelled and sequence.finish_reason is None:
                sequence.finish_reason = "cancelled"
            if sequence.finish_reason is None:
                keep.append(row)
            else:
                gone.append(sequence)
        if not gone:
            return gone
        if self.prefixes is not None:
            for row, sequence in enumerate(self.sequences):
                if sequence.finish_reason not in (None, "cancelled"):
                    self.remember_finished(row, sequence)
        if not keep:
            self.clear()
            return gone
        self.sequences = [self.sequences[row] for row in keep]
        self.cache.keep_rows(keep)
        self.mask = self.mask[keep]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            self.cache.drop_leading(unused)
            self.mask = self.mask[:, unused:]
        return gone
