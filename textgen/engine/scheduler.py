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

from textgen.engine.batch import RunningBatch, unit_rows
from textgen.engine.events import Finished
from textgen.engine.metrics import EngineMetrics
from textgen.engine.prefix import PrefixCache
from textgen.engine.recorder import Recorder, Recorders
from textgen.engine.request import RequestHandle
from textgen.engine.runner import Job, ModelRunner
from textgen.engine.sequence import Row
from textgen.errors import QueueFull, RequestRejected
from textgen.generation.finish import FinishReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """How much work one engine takes on."""

    max_batch: int  # rows decoded together
    max_requests: int  # requests accepted and not finished (running or waiting)
    max_pending_tokens: int  # tokens those requests may still generate
    prefix_cache_tokens: int = 0  # prompt tokens whose keys/values are kept for reuse (0: off)
    draft_tokens: int = 0  # tokens a lone greedy row may guess and check per step (0: off)
    prefill_chunk_tokens: int = 256  # prompt tokens computed between two decode steps


def retry_after(
    running_rows_left: list[int],
    step_seconds: float,
    pending_tokens: int,
    excess_tokens: int,
    tokens_per_second: float,
) -> int:
    """Seconds until a rejected request would be accepted, from the measured speed.

    A full queue frees a place when its first running request finishes (``running_rows_left``:
    the tokens each running request's rows still have to go, which they make one per step); too
    many pending tokens need ``excess_tokens`` of them generated first.
    """
    waits = [0.0]
    if running_rows_left:
        waits.append(min(running_rows_left) * step_seconds)
    elif pending_tokens:
        waits.append(pending_tokens / max(tokens_per_second, 1.0))
    if excess_tokens > 0:
        waits.append(excess_tokens / max(tokens_per_second, 1.0))
    return max(1, min(600, math.ceil(max(waits))))


class Engine:
    """Continuous batching: requests join the running batch between steps and leave when done.

    The lock guards the waiting queue and the set of accepted requests; it is never held while
    an event is posted (a request's last Finished releases its capacity, which takes the lock).
    """

    def __init__(self, runner: ModelRunner, limits: EngineLimits) -> None:
        self.runner = runner
        self.limits = limits
        # Its own record (/info's snapshot, Retry-After's speed), and any other (Prometheus)
        # that ``also_record`` adds.
        self.metrics = EngineMetrics()
        self.record = Recorders(self.metrics)
        self._waiting: deque[RequestHandle] = deque()
        self._active: set[RequestHandle] = set()
        self._wake = threading.Condition(threading.Lock())
        prefixes = PrefixCache(limits.prefix_cache_tokens) if limits.prefix_cache_tokens else None
        loaded = runner.loaded
        self._batch = RunningBatch(
            loaded.model,
            loaded.pad_token_id,
            self.record,
            prefixes,
            loaded.program,
            limits.draft_tokens,
            limits.prefill_chunk_tokens,
        )
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, name=f"engine-{runner.name}", daemon=True
        )

    @property
    def name(self) -> str:
        return self.runner.name

    def also_record(self, recorder: Recorder) -> None:
        """Report to ``recorder`` too, from now on (the warm-up is not the users' traffic)."""
        self.record.add(recorder)

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
        if job.params.num_beams > self.limits.max_batch:
            raise RequestRejected(
                f"num_beams ({job.params.num_beams}) exceeds this server's batch of "
                f"{self.limits.max_batch} rows",
                "num_beams",
            )
        handle = RequestHandle(self.name, job, events, deadline)
        handle.on_complete = self._complete
        with self._wake:
            pending = self._pending_tokens()
            excess = pending + handle.tokens_budget - self.limits.max_pending_tokens
            if len(self._active) >= self.limits.max_requests or (self._active and excess > 0):
                raise self._full(pending, excess)
            self._active.add(handle)
            self._waiting.append(handle)
            self.record.submitted()
            self._publish_gauges()
            self._wake.notify()
        return handle

    def _pending_tokens(self) -> int:
        """Tokens the accepted requests may still generate (call with the lock held)."""
        return sum(max(0, h.tokens_budget - h.generated) for h in self._active)

    def check_room(self) -> None:
        """Raise QueueFull at once if no request can join now: a handler calls this before it
        tokenizes a request, so that refusals stay cheap while the engine is busy."""
        with self._wake:
            if len(self._active) >= self.limits.max_requests:
                raise self._full(self._pending_tokens(), 0)

    def has_room(self) -> bool:
        """Whether a request could join now (not counted as a refusal when it cannot)."""
        with self._wake:
            return len(self._active) < self.limits.max_requests

    def drain_seconds(self) -> int:
        """Seconds until the first request running now finishes, from the measured speed (1 at
        least): when a worker whose threads are all taken has one free again."""
        with self._wake:
            return self._retry_after(self._pending_tokens(), 0)

    def _full(self, pending: int, excess: int) -> QueueFull:
        """The refusal for the current load, counted (call with the lock held)."""
        self.record.rejected("queue_full")
        return QueueFull(
            f"model {self.name!r} is at capacity ({len(self._active)} requests, "
            f"{pending} tokens to generate)",
            self._retry_after(pending, excess),
        )

    def _retry_after(self, pending: int, excess: int) -> int:
        """retry_after for the current load (call with the lock held)."""
        running = [
            max(0, h.tokens_budget - h.generated) // h.rows
            for h in self._active
            if h.admitted is not None and not h.complete
        ]
        return retry_after(
            running, self.metrics.step_seconds, pending, excess, self.metrics.throughput
        )

    def _publish_gauges(self) -> None:
        prefixes = self._batch.prefixes
        self.record.load(
            queued=len(self._waiting),
            running=len(self._batch),
            pending_tokens=self._pending_tokens(),
            prefix_tokens=prefixes.tokens if prefixes is not None else 0,
            prefix_bytes=prefixes.bytes if prefixes is not None else 0,
        )

    # --- engine thread ---------------------------------------------------------------
    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        batch = self._batch
        while True:
            with self._wake:
                while not (self._waiting or batch.rows or batch.prefills or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                rows, expired, dropped = self._admit()
            for handle in expired:
                self._expire(handle)
            try:
                with torch.inference_mode():
                    if rows:
                        batch.start(rows)
                    if batch.prefills:
                        batch.prefill_next()
                        batch.evict()  # rows whose first choice failed have no input
                    if batch.rows:
                        batch.step()
                    batch.evict()
            except Exception as exc:
                # A decode step is shared by every row: after an error in one (not a row's
                # own choice, which advance() keeps to its request) the batch state is not
                # trustworthy, so its rows fail. Nothing a request sends is known to do this.
                log.exception("engine %s failed a step", self.name)
                for row in batch.rows:
                    row.handle.fail(f"generation failed: {type(exc).__name__}")
                batch.clear()
            self._settle(dropped + [row.handle for row in batch.departed])
            batch.departed.clear()
            with self._wake:
                self._publish_gauges()
        with self._wake:
            leftover = set(self._waiting) | {row.handle for row in batch.rows}
            leftover |= {row.handle for row in batch.prefills.rows()}
            self._waiting.clear()
        batch.clear()
        for handle in leftover:
            handle.fail("the server is shutting down")
        self._settle(list(leftover))

    def _admit(self) -> tuple[list[Row], list[RequestHandle], list[RequestHandle]]:
        """Take waiting work that fits the batch, the queue's head first (call with the lock
        held): new rows, requests whose deadline passed while they waited, and requests that
        were cancelled or failed before they started."""
        now = time.perf_counter()
        rows: list[Row] = []
        expired: list[RequestHandle] = []
        dropped: list[RequestHandle] = []
        room = self.limits.max_batch - self._batch.occupied
        while self._waiting:
            handle = self._waiting[0]
            if handle.abandoned or not handle.pending:
                self._waiting.popleft()
                handle.pending.clear()
                dropped.append(handle)
                continue
            if handle.admitted is None and now > handle.deadline:
                self._waiting.popleft()
                expired.append(handle)
                continue
            unit = handle.pending[0]
            if unit.rows > room:
                break
            handle.pending.popleft()
            room -= unit.rows
            if handle.admitted is None:
                handle.admitted = now
                prompt = sum(len(p) for p in handle.job.encoded)
                self.record.admitted(now - handle.created, prompt)
            rows.extend(unit_rows(handle, unit, self.runner.loaded))
            if not handle.pending:
                self._waiting.popleft()
        self._publish_gauges()
        return rows, expired, dropped

    def _expire(self, handle: RequestHandle) -> None:
        """A request whose deadline passed while it waited: its outputs end with no tokens."""
        for prompt_index in range(len(handle.job.encoded)):
            for index in range(handle.job.params.num_return_sequences):
                handle.post(Finished(prompt_index, index, "", FinishReason.TIME_LIMIT, 0))

    def _settle(self, handles: list[RequestHandle]) -> None:
        """Release the capacity of requests that have nothing left in the engine."""
        for handle in set(handles):
            if handle.complete:
                continue  # released when its last output finished
            if handle.abandoned and not handle.pending and not self._batch.holds(handle):
                if self._complete(handle) and handle.cancelled:
                    self.record.cancelled()

    def _complete(self, handle: RequestHandle) -> bool:
        """Forget a request's claim on capacity; whether it still had one."""
        with self._wake:
            if handle not in self._active:
                return False
            self._active.discard(handle)
            return True
