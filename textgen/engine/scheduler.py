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

from textgen.engine.batch import RunningBatch, new_sequences
from textgen.engine.metrics import EngineMetrics
from textgen.engine.prefix import PrefixCache
from textgen.engine.sequence import Delta, Failed, Finished, RequestHandle, Sequence
from textgen.generation.runner import Job, ModelRunner

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
    prefix_cache_tokens: int = 0  # prompt tokens whose keys/values are kept for reuse (0: off)
    draft_tokens: int = 0  # tokens a lone greedy row may guess and check per step (0: off)


class Engine:
    """Continuous batching: requests join the running batch between steps and leave when done."""

    def __init__(self, runner: ModelRunner, limits: EngineLimits) -> None:
        self.runner = runner
        self.limits = limits
        self.metrics = EngineMetrics()
        self._waiting: deque[RequestHandle] = deque()
        self._active: set[RequestHandle] = set()
        self._wake = threading.Condition()
        prefixes = PrefixCache(limits.prefix_cache_tokens) if limits.prefix_cache_tokens else None
        loaded = runner.loaded
        self._batch = RunningBatch(
            loaded.model,
            loaded.pad_token_id,
            self.metrics,
            prefixes,
            loaded.program,
            limits.draft_tokens,
        )
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
        handle.on_complete = self._complete
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
        prefixes = self._batch.prefixes
        self.metrics.set(
            queued=len(self._waiting),
            running=len(self._batch.sequences),
            pending_tokens=self._pending_tokens(),
            prefix_cache_tokens=prefixes.tokens if prefixes is not None else 0,
            prefix_cache_bytes=prefixes.bytes if prefixes is not None else 0,
        )

    # --- engine thread ---------------------------------------------------------------
    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._waiting and not self._batch.sequences and not self._stopping:
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
                    if self._batch.sequences:
                        self._step()
            except Exception as exc:  # keep serving: fail the affected requests, not the worker
                log.exception("engine %s failed a step", self.name)
                handles = {s.handle for s in admitted + self._batch.sequences}
                if exclusive is not None:
                    handles.add(exclusive)
                self._fail(handles, f"generation failed: {type(exc).__name__}")
            with self._wake:
                self._publish_gauges()
        with self._wake:
            leftover = set(self._waiting) | {s.handle for s in self._batch.sequences}
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
                if self._batch.sequences or admitted:
                    break
                self._waiting.popleft()
                return [], handle
            rows = len(self._batch.sequences) + len(admitted) + handle.outputs
            if rows > self.limits.max_batch and (self._batch.sequences or admitted):
                break
            self._waiting.popleft()
            admitted.extend(self._sequences(handle, now))
        return admitted, None

    def _sequences(self, handle: RequestHandle, now: float) -> list[Sequence]:
        handle.admitted = now
        self.metrics.observe("queue_s", now - handle.created)
        self.metrics.count("prompt_tokens", sum(len(p) for p in handle.job.encoded))
        return new_sequences(handle, self.runner)

    def _prefill(self, sequences: list[Sequence]) -> None:
        self._batch.add(sequences)
        self._evict()

    def _step(self) -> None:
        self._batch.step()
        self._evict()

    def _evict(self) -> None:
        for sequence in self._batch.evict():
            self._sequence_done(sequence)

    def _sequence_done(self, sequence: Sequence) -> None:
        if sequence.finish_reason != "cancelled":
            return  # its Finished event released the request (RequestHandle.post)
        # A cancelled row posts nothing, so it is counted here.
        handle = sequence.handle
        handle.done += 1
        if handle.complete:
            self.metrics.count("cancelled")
            self._complete(handle)

    def _complete(self, handle: RequestHandle) -> None:
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

    def _run_exclusive(self, handle: RequestHandle) -> None:
        """Run a request that cannot share a batch (beam search) on its own."""
        handle.admitted = time.perf_counter()

        def interrupted() -> bool:
            return handle.cancelled or time.perf_counter() > handle.deadline

        try:
            outputs = self.runner.run(handle.job, interrupted)
        except BaseException:
            self._complete(handle)
            raise
        handle.first_token = time.perf_counter()
        if handle.cancelled:
            self.metrics.count("cancelled")
            self._complete(handle)  # nobody reads the outputs, so none are posted
            return
        timed_out = time.perf_counter() > handle.deadline
        self.metrics.count("generated_tokens", sum(o.completion_tokens for o in outputs))
        for output in outputs:
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
        self._batch.clear()
        with self._wake:
            for handle in handles:
                handle.post(Failed(message))
                self._release(handle)
