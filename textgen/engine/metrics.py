"""The engine's own record of what it did (the Recorder /info's snapshot and Retry-After read):
counters, gauges, recent latency samples and the smoothed speed."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

SAMPLES = 2048


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile, or None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def smooth(average: float, sample: float) -> float:
    """An exponential moving average (the first sample starts it)."""
    return sample if not average else 0.8 * average + 0.2 * sample


class EngineMetrics:
    """Thread-safe counters, gauges and recent latency samples of one engine (a Recorder)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = {
            "requests": 0,
            "rejected": 0,
            "cancelled": 0,
            "prompt_tokens": 0,
            "prompt_tokens_cached": 0,
            "generated_tokens": 0,
            "steps": 0,
            "draft_tokens": 0,
            "draft_tokens_accepted": 0,
        }
        self.gauges = {
            "queued": 0,
            "running": 0,
            "pending_tokens": 0,
            "prefix_cache_tokens": 0,
            "prefix_cache_bytes": 0,
        }
        self.samples: dict[str, deque[float]] = {
            name: deque(maxlen=SAMPLES)
            for name in ("queue_s", "time_to_first_token_s", "inter_token_s", "batch_size")
        }
        self.throughput = 0.0  # generated tokens/s, exponentially smoothed over steps
        self.step_seconds = 0.0  # a decode step's duration, smoothed the same way

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def _observe(self, name: str, value: float) -> None:
        with self._lock:
            self.samples[name].append(value)

    def submitted(self) -> None:
        self._count("requests")

    def rejected(self, reason: str) -> None:
        self._count("rejected")

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        with self._lock:
            self.samples["queue_s"].append(queue_s)
            self.counters["prompt_tokens"] += prompt_tokens

    def cached(self, tokens: int) -> None:
        self._count("prompt_tokens_cached", tokens)

    def first_token(self, seconds: float) -> None:
        self._observe("time_to_first_token_s", seconds)

    def inter_token(self, seconds: float) -> None:
        self._observe("inter_token_s", seconds)

    def drafted(self, guessed: int, kept: int) -> None:
        with self._lock:
            self.counters["draft_tokens"] += guessed
            self.counters["draft_tokens_accepted"] += kept

    def cancelled(self) -> None:
        self._count("cancelled")

    def load(
        self, queued: int, running: int, pending_tokens: int, prefix_tokens: int, prefix_bytes: int
    ) -> None:
        with self._lock:
            self.gauges.update(
                queued=queued,
                running=running,
                pending_tokens=pending_tokens,
                prefix_cache_tokens=prefix_tokens,
                prefix_cache_bytes=prefix_bytes,
            )

    def joined(self, rows: int) -> None:
        self._count("generated_tokens", rows)

    def step(self, rows: int, tokens: int, seconds: float) -> None:
        """One decode step: its batch size, the tokens it gave (more than the rows when a
        draft was checked) and its duration."""
        with self._lock:
            self.counters["steps"] += 1
            self.counters["generated_tokens"] += tokens
            self.samples["batch_size"].append(rows)
            if seconds > 0:
                self.throughput = smooth(self.throughput, tokens / seconds)
                self.step_seconds = smooth(self.step_seconds, seconds)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: counters, gauges, p50/p95 of each sample set."""
        with self._lock:
            out: dict[str, Any] = {**self.counters, **self.gauges}
            out["throughput_tokens_per_s"] = round(self.throughput, 2)
            for name, values in self.samples.items():
                data = list(values)
                out[name] = {"p50": percentile(data, 0.5), "p95": percentile(data, 0.95)}
        return out
