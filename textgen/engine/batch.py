"""The running batch: the rows decoded together, their KV cache rows and attention mask."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from textgen.engine.beams import BeamSearch
from textgen.engine.compiled import CompiledForward
from textgen.engine.decode import DecodeStep, decode_step_for
from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.engine.draft import NgramDraft
from textgen.engine.events import Delta, Finished, TokenLogprob
from textgen.engine.kvcache import BatchCache, merge_masks
from textgen.engine.logprobs import token_logprob
from textgen.engine.prefill import Prefills
from textgen.engine.prefix import PrefixCache
from textgen.engine.recorder import Recorder
from textgen.engine.request import RequestHandle, Unit
from textgen.engine.sampling import TokenChooser, argmaxes
from textgen.engine.sequence import BeamRow, Row, Sequence
from textgen.generation.finish import StoppingCriteria
from textgen.generation.stopping import StopSequenceMatcher
from textgen.models.loading import LoadedModel


def unit_rows(handle: RequestHandle, unit: Unit, loaded: LoadedModel) -> list[Row]:
    """The rows of one unit of a request: an output's Sequence, or a prompt's first beam (its
    search widens it to num_beams rows at the first step)."""
    params = handle.job.params
    assert params.max_new_tokens is not None
    prompt = handle.job.encoded[unit.prompt_index]

    def decode(ids: list[int]) -> str:
        return str(loaded.tokenizer.decode(ids, skip_special_tokens=True))

    eos = frozenset() if params.ignore_eos else frozenset(loaded.eos_token_ids)
    criteria = StoppingCriteria(
        eos, params.max_new_tokens, StopSequenceMatcher(params.stop), params.repetition_stop
    )
    if params.num_beams > 1:
        search = BeamSearch(prompt, params, criteria, decode)
        return [BeamRow(handle, unit.prompt_index, prompt, search=search)]
    chooser = TokenChooser(
        params, unit.index, len(prompt), eos, handle.job.grammar, params.max_new_tokens
    )
    return [
        Sequence(
            handle,
            unit.prompt_index,
            prompt,
            index=unit.index,
            chooser=chooser,
            detokenizer=IncrementalDetokenizer(decode),
            criteria=criteria,
        )
    ]


class RunningBatch:
    """Rows of the batch, in the same order as the KV cache's and the mask's rows, and the
    prefills of rows about to join."""

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        record: Recorder,
        prefixes: PrefixCache | None = None,
        program: Any = None,
        draft_tokens: int = 0,
        chunk_tokens: int = 256,
    ) -> None:
        self.prefixes = prefixes
        # The compiled decoder, when the model has one, runs both prefills and decode steps;
        # transformers' forward the rest (and prompts whose every position's logits are wanted).
        transformers = DecodeStep(model)
        compiled = CompiledForward(model, program) if program is not None else None
        self.decode: DecodeStep | CompiledForward = compiled or decode_step_for(model)
        self.prefills = Prefills(
            compiled or transformers, transformers, prefixes, pad_token_id, record, chunk_tokens
        )
        # A lone greedy row checks up to this many tokens guessed from its text per step (the
        # compiled decoder does a few tokens of one row in little more than the time of one).
        self.draft_tokens = draft_tokens if compiled is not None else 0
        self.record = record
        self.rows: list[Row] = []
        self.cache: BatchCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token
        self.departed: list[Row] = []  # rows that left since the engine last looked

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def occupied(self) -> int:
        """Rows decoding or being prefilled (a prompt's beams count in full)."""
        waiting = sum(row.handle.job.params.num_beams for row in self.prefills.rows())
        return len(self.rows) + waiting

    def holds(self, handle: RequestHandle) -> bool:
        """Whether any of the request's rows is decoding or being prefilled."""
        return any(row.handle is handle for row in self.rows) or any(
            row.handle is handle for row in self.prefills.rows()
        )

    def clear(self) -> None:
        """Drop every row and prefill (after an unexpected error in a decode step)."""
        self.departed.extend(self.rows)
        self.departed.extend(self.prefills.clear())
        self.rows, self.cache, self.mask = [], None, None

    # --- prefills ------------------------------------------------------------------------
    def start(self, rows: list[Row]) -> None:
        """Queue new rows for their prefill."""
        self.prefills.start(rows)

    def prefill_next(self) -> None:
        """One chunk of the prefill whose turn it is; a complete prefill's rows join the batch."""
        done = self.prefills.next(bool(self.rows), self.departed)
        if done is not None:
            job, logits = done
            self.join(job.rows, job.cache, job.mask, logits)

    def join(
        self, rows: list[Row], cache: BatchCache, mask: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """Add prefilled rows below the running ones, and choose their first tokens."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            self.cache.extend(cache)
            self.mask = merge_masks(self.mask, mask)
        self.rows.extend(rows)
        self.advance(rows, logits)
        self.record.joined(len(rows))

    # --- decode steps --------------------------------------------------------------------
    def step(self) -> None:
        """One decode step for every row; a lone greedy row may check a draft in it."""
        assert self.cache is not None and self.mask is not None
        started = time.perf_counter()
        rows = len(self.rows)
        lone = self.rows[0] if rows == 1 else None
        draft = self.draft_for(lone) if isinstance(lone, Sequence) else []
        if draft:
            assert isinstance(lone, Sequence)
            tokens = self.check_draft(lone, draft)
        else:
            ids = torch.tensor([[row.next_input] for row in self.rows])
            positions = self.grow(1)
            self.advance(self.rows, self.decode(ids, positions, self.mask, self.cache))
            tokens = rows
        self.record.step(rows, tokens, time.perf_counter() - started)

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
        if room < 1 or not sequence.plain_greedy or logprobs is not None:
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
        picks = argmaxes(self.decode.every(ids, positions, self.mask, self.cache)[0])
        now = time.perf_counter()
        taken = 0
        for index, token in enumerate(picks):
            self.take(sequence, token, None, now)
            taken += 1
            if sequence.finish_reason is not None or index == len(draft) or token != draft[index]:
                break
        self.record.drafted(len(draft), taken - 1)
        # The columns of the inputs whose next token was taken: the one before the draft and
        # the guesses that proved right.
        self.cache.truncate(start + taken)
        self.mask = self.mask[:, : start + taken]
        return taken

    def advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token (one argmax for all plain-greedy rows; a beam search
        for its rows together). ``rows`` are the last rows of the batch, ``logits`` theirs.

        Whatever goes wrong in one row's choice ends that row's request alone.
        """
        now = time.perf_counter()
        offset = len(self.rows) - len(rows)
        plain = [i for i, row in enumerate(rows) if isinstance(row, Sequence) and row.plain_greedy]
        picks: dict[int, int] = {}
        if plain:
            chosen = logits if len(plain) == len(rows) else logits[plain]  # no copy if all
            picks = dict(zip(plain, argmaxes(chosen), strict=True))
        searches: dict[int, list[int]] = {}
        for number, row in enumerate(rows):
            if isinstance(row, BeamRow):
                searches.setdefault(id(row.search), []).append(number)
                continue
            assert isinstance(row, Sequence)
            if row.handle.abandoned:
                continue
            try:
                token = picks.get(number)
                if token is None:
                    assert row.chooser is not None
                    token = row.chooser.choose(row.history(), logits[number])
                wanted = row.handle.job.params.logprobs
                logprob = None if wanted is None else token_logprob(logits[number], token, wanted)
                self.take(row, token, logprob, now)
            except Exception as exc:
                row.handle.fail_with(exc)
        if searches:
            self.advance_beams(rows, logits, searches, offset, now)

    def take(self, row: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Give ``row`` its next token, chosen at ``now``."""
        self.note_token(row, now)
        row.accept(token, now > row.handle.deadline, logprob)
        row.handle.generated += 1

    def note_token(self, row: Row, now: float) -> None:
        handle = row.handle
        if handle.first_token is None:
            handle.first_token = now
            self.record.first_token(now - handle.created)
        if row.last_token_at is not None:
            self.record.inter_token(now - row.last_token_at)
        row.last_token_at = now

    def advance_beams(
        self,
        rows: list[Row],
        logits: torch.Tensor,
        searches: dict[int, list[int]],
        offset: int,
        now: float,
    ) -> None:
        """One step of each beam search among ``rows``; its rows are replaced by the beams
        that go on (the cache rows of the beams they continue, copied)."""
        order = list(range(offset))
        replaced: list[Row] = []
        for number, row in enumerate(rows):
            if not isinstance(row, BeamRow):
                order.append(offset + number)
                replaced.append(row)
                continue
            group = searches.pop(id(row.search), None)
            if group is None:
                continue  # a later row of a search already stepped
            new = self.step_search(row, [rows[i] for i in group], logits[group], now)
            if new is None:  # ended (or failed): the old rows stay, to leave at eviction
                order.extend(offset + i for i in group)
                replaced.extend(rows[i] for i in group)
                continue
            order.extend(offset + group[parent] for parent, _ in new)
            replaced.extend(beam for _, beam in new)
        assert self.cache is not None and self.mask is not None
        if order != list(range(len(self.rows))):
            self.cache.keep_rows(order)
            self.mask = self.mask[order]
        self.rows = self.rows[:offset] + replaced

    def step_search(
        self, first: BeamRow, group: list[Row], logits: torch.Tensor, now: float
    ) -> list[tuple[int, BeamRow]] | None:
        """A search's next beams as (row it continues, new row), or None once it ended."""
        search, handle = first.search, first.handle
        assert search is not None
        if handle.abandoned:
            return None
        try:
            self.note_token(first, now)
            expired = now > handle.deadline
            step = search.step(logits, expired)
            handle.generated += len(group)
            if search.done:
                self.post_beams(handle, first.prompt_index, search, expired)
                return None
        except Exception as exc:
            handle.fail_with(exc)
            return None
        return [
            (parent, BeamRow(handle, first.prompt_index, first.prompt, token, search=search))
            for parent, token in zip(step.parents, step.tokens, strict=True)
        ]

    def post_beams(
        self, handle: RequestHandle, prompt_index: int, search: BeamSearch, expired: bool
    ) -> None:
        """A finished search's outputs: each its whole text, then its end."""
        for index, (text, reason, count) in enumerate(search.outputs(expired)):
            handle.post(Delta(prompt_index, index, text))
            handle.post(Finished(prompt_index, index, text, reason, count))

    # --- leaving -------------------------------------------------------------------------
    def remember_finished(self, row: int, sequence: Sequence) -> None:
        """Keep a finished row's prompt and output (all but the last token, which was chosen
        but never run) for reuse: the next turn of a chat starts with them."""
        assert self.prefixes is not None and self.cache is not None and self.mask is not None
        columns = self.mask[row].nonzero().flatten()
        tokens = sequence.prompt + sequence.generated[:-1]
        if len(columns) == len(tokens):
            self.prefixes.store(tokens, partial(self.cache.copy_row, row, columns))

    def evict(self) -> None:
        """Remove rows that ended (to ``departed``); drop cache columns no row needs."""
        if not self.rows:
            return
        assert self.cache is not None and self.mask is not None
        keep = [number for number, row in enumerate(self.rows) if not row.ended]
        if len(keep) == len(self.rows):
            return
        if self.prefixes is not None:
            for number, row in enumerate(self.rows):
                if isinstance(row, Sequence) and row.ended and not row.handle.abandoned:
                    self.remember_finished(number, row)
        self.departed.extend(row for row in self.rows if row.ended)
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.rows = [self.rows[number] for number in keep]
        self.cache.keep_rows(keep)
        self.mask = self.mask[keep]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            self.cache.drop_leading(unused)
            self.mask = self.mask[:, unused:]
