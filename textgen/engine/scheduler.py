"""The engine: one thread owns a model and runs every request's decode steps in one batch."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.engine.kvcache import BatchCache
from textgen.engine.metrics import EngineMetrics
from textgen.engine.sampling import TokenChooser
from textgen.engine.sequence import (
    Delta,
    Failed,
    Finished,
    RequestHandle,
    Sequence,
    TokenLogprob,
)
from textgen.generation.runner import Job, ModelRunner
from textgen.generation.stopping import StopSequenceMatcher

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine holds as much work as it may; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class EngineLimits:
    """How much work one engine takes on."""

    max_batch: int  # sequences decoded together
    max_requests: int  # requests accepted and not finished (running or waiting)
    max_pending_tokens: int  # tokens those requests may still generate


class Engine:
    """Continuous batching: requests join the running batch between steps and leave when done."""

    def __init__(self, runner: ModelRunner, limits: EngineLimits) -> None:
        self.runner = runner
        self.limits = limits
        self.metrics = EngineMetrics()
        self._waiting: deque[RequestHandle] = deque()
        self._active: set[RequestHandle] = set()
        self._wake = threading.Condition()
        self._running: list[Sequence] = []
        self._cache: BatchCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, name=f"engine-{runner.name}", daemon=True
        )

    @property
    def name(self) -> str:
        return self.runner.name

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail what is left, and end the thread.

        Must run before the interpreter finalizes: a daemon thread caught inside torch then
        is unwound through C++ frames, and the process aborts.
        """
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- request side (handler threads) ----------------------------------------------
    def submit(self, job: Job, events: queue.Queue[Any], deadline: float) -> RequestHandle:
        """Queue a prepared job; its events go to ``events``. Raises QueueFull when full."""
        handle = RequestHandle(self.name, job, events, deadline)
        with self._wake:
            pending = self._pending_tokens()
            if len(self._active) >= self.limits.max_requests or (
                self._active and pending + handle.tokens_budget > self.limits.max_pending_tokens
            ):
                self.metrics.count("rejected")
                raise QueueFull(
                    f"model {self.name!r} is at capacity ({len(self._active)} requests, "
                    f"{pending} tokens to generate)",
                    self.retry_after(pending),
                )
            self._active.add(handle)
            self._waiting.append(handle)
            self.metrics.count("requests")
            self._publish_gauges()
            self._wake.notify()
        return handle

    def _pending_tokens(self) -> int:
        """Tokens the accepted requests may still generate (call with the lock held)."""
        return sum(max(0, h.tokens_budget - h.generated) for h in self._active)

    def retry_after(self, pending: int) -> int:
        """Seconds until the pending work is likely done, from the measured throughput."""
        rate = max(self.metrics.throughput, 1.0)
        return max(1, min(600, math.ceil(pending / rate)))

    def _publish_gauges(self) -> None:
        self.metrics.set(
            queued=len(self._waiting),
            running=len(self._running),
            pending_tokens=self._pending_tokens(),
        )

    # --- engine thread ---------------------------------------------------------------
    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted, exclusive = self._admit()
            try:
                with torch.inference_mode():
                    if exclusive is not None:
                        self._run_exclusive(exclusive)
                    if admitted:
                        self._prefill(admitted)
                    if self._running:
                        self._step()
            except Exception as exc:  # keep serving: fail the affected requests, not the worker
                log.exception("engine %s failed a step", self.name)
                handles = {s.handle for s in admitted + self._running}
                if exclusive is not None:
                    handles.add(exclusive)
                self._fail(handles, f"generation failed: {type(exc).__name__}")
            with self._wake:
                self._publish_gauges()
        with self._wake:
            leftover = set(self._waiting) | {s.handle for s in self._running}
            self._waiting.clear()
        self._fail(leftover, "the server is shutting down")

    def _admit(self) -> tuple[list[Sequence], RequestHandle | None]:
        """Take waiting requests that fit the batch (the head first, in order)."""
        now = time.perf_counter()
        admitted: list[Sequence] = []
        while self._waiting:
            handle = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()
                self._release(handle)
                self.metrics.count("cancelled")
                continue
            if now > handle.deadline:
                self._waiting.popleft()
                self._expire(handle)
                continue
            if handle.job.params.num_beams > 1:
                # Beam search cannot share a step with other requests: it runs alone, once
                # the batch has drained.
                if self._running or admitted:
                    break
                self._waiting.popleft()
                return [], handle
            rows = len(self._running) + len(admitted) + handle.outputs
            if rows > self.limits.max_batch and (self._running or admitted):
                break
            self._waiting.popleft()
            admitted.extend(self._sequences(handle, now))
        return admitted, None

    def _sequences(self, handle: RequestHandle, now: float) -> list[Sequence]:
        handle.admitted = now
        self.metrics.observe("queue_s", now - handle.created)
        loaded = self.runner.loaded
        params = handle.job.params
        assert params.max_new_tokens is not None
        out = []
        for prompt_index, prompt in enumerate(handle.job.encoded):
            self.metrics.count("prompt_tokens", len(prompt))
            eos = frozenset() if params.ignore_eos else frozenset(loaded.eos_token_ids)
            for index in range(params.num_return_sequences):
                out.append(
                    Sequence(
                        handle=handle,
                        prompt_index=prompt_index,
                        index=index,
                        prompt=prompt,
                        chooser=TokenChooser(
                            params,
                            index,
                            len(prompt),
                            eos,
                            handle.job.grammar,
                            params.max_new_tokens,
                        ),
                        detokenizer=IncrementalDetokenizer(self._decode),
                        matcher=StopSequenceMatcher(params.stop),
                        eos=eos,
                        budget=params.max_new_tokens,
                    )
                )
        return out

    def _decode(self, ids: list[int]) -> str:
        return str(self.runner.loaded.tokenizer.decode(ids, skip_special_tokens=True))

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Run the new prompts together (left-padded), then add them to the running batch."""
        width = max(len(s.prompt) for s in sequences)
        pad = self.runner.loaded.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in sequences])
        mask = torch.tensor(
            [[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in sequences]
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = BatchCache()
        # Logits for every prompt position only when a request wants its prompt's logprobs.
        echo = any(s.handle.job.params.prompt_logprobs for s in sequences)
        out = self.runner.loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if echo else 1,
        )
        if echo:
            record_prompt_logprobs(sequences, out.logits, width)
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
        else:
            self._cache.extend(cache)
            self._mask = merge_masks(self._mask, mask)
        self._running.extend(sequences)
        self._advance(sequences, out.logits[:, -1, :])
        self._evict()

    def _step(self) -> None:
        """One decode step for every running sequence."""
        assert self._cache is not None and self._mask is not None
        started = time.perf_counter()
        rows = len(self._running)
        ids = torch.tensor([[s.next_input] for s in self._running])
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones(rows, 1)], dim=1)
        out = self.runner.loaded.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._advance(self._running, out.logits[:, -1, :])
        self.metrics.step(rows, time.perf_counter() - started)
        self._evict()

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each sequence's next token (one argmax for all plain-greedy rows)."""
        now = time.perf_counter()
        greedy = [i for i, s in enumerate(sequences) if s.chooser.is_plain_greedy]
        choices: dict[int, int] = {}
        if greedy:
            picks = logits[greedy].argmax(dim=-1).tolist()
            choices = dict(zip(greedy, picks, strict=True))
        for row, sequence in enumerate(sequences):
            token = choices.get(row)
            if token is None:
                token = sequence.chooser.choose(sequence.history(), logits[row])
            wanted = sequence.handle.job.params.logprobs
            logprob = None if wanted is None else token_logprob(logits[row], token, wanted)
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

    def _evict(self) -> None:
        """Remove finished and cancelled rows; drop cache columns no row needs any more."""
        assert self._cache is not None and self._mask is not None
        keep = []
        for row, sequence in enumerate(self._running):
            if sequence.handle.cancelled and sequence.finish_reason is None:
                sequence.finish_reason = "cancelled"
            if sequence.finish_reason is None:
                keep.append(row)
            else:
                self._sequence_done(sequence)
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
        else:
            self._running = [self._running[row] for row in keep]
            self._cache.keep_rows(keep)
            self._mask = self._mask[keep]
            unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
            if unused:
                self._cache.drop_leading(unused)
                self._mask = self._mask[:, unused:]

    def _sequence_done(self, sequence: Sequence) -> None:
        handle = sequence.handle
        if sequence.finish_reason == "cancelled":
            # A cancelled row posts nothing, so count it here.
            handle.done += 1
        if handle.complete:
            if handle.cancelled:
                self.metrics.count("cancelled")
            with self._wake:
                self._release(handle)

    def _release(self, handle: RequestHandle) -> None:
        """Forget a request's claim on capacity (call with the lock held)."""
        self._active.discard(handle)

    def _expire(self, handle: RequestHandle) -> None:
        """A request whose deadline passed while it waited: it ends with no tokens."""
        for prompt_index in range(len(handle.job.encoded)):
            for index in range(handle.job.params.num_return_sequences):
                handle.post(Finished(prompt_index, index, "", "time_limit", 0))
        self._release(handle)

    def _run_exclusive(self, handle: RequestHandle) -> None:
        """Run a request that cannot share a batch (beam search) on its own."""
        handle.admitted = time.perf_counter()

        def interrupted() -> bool:
            return handle.cancelled or time.perf_counter() > handle.deadline

        try:
            result = self.runner.run(handle.job, interrupted)
        finally:
            with self._wake:
                self._release(handle)
        handle.first_token = time.perf_counter()
        if handle.cancelled:
            self.metrics.count("cancelled")
            return
        timed_out = time.perf_counter() > handle.deadline
        self.metrics.count("generated_tokens", result.completion_tokens)
        for output in result.outputs:
            handle.post(Delta(output.prompt_index, output.index, output.text))
            reason = "time_limit" if timed_out and output.finish_reason == "length" else None
            handle.post(
                Finished(
                    output.prompt_index,
                    output.index,
                    output.text,
                    reason or output.finish_reason,
                    output.completion_tokens,
                )
            )

    def _fail(self, handles: set[RequestHandle], message: str) -> None:
        """After an unexpected error: end these requests with an error event, and the batch."""
        self._running, self._cache, self._mask = [], None, None
        with self._wake:
            for handle in handles:
                handle.post(Failed(message))
                self._release(handle)


def merge_masks(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Stack two attention masks, left-padding the narrower one (as the cache rows are)."""
    width = max(top.shape[1], bottom.shape[1])
    return torch.cat(
        [
            torch.nn.functional.pad(top, (width - top.shape[1], 0)),
            torch.nn.functional.pad(bottom, (width - bottom.shape[1], 0)),
        ]
    )


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
