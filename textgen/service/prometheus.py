"""Prometheus metrics, named as vLLM names its own (``textgen:`` for ``vllm:``) so that its
dashboards' queries carry over. Correct across gunicorn workers: with PROMETHEUS_MULTIPROC_DIR
set (gunicorn.conf.py sets it), every worker writes its values to files there and /metrics
sums them; a dead worker's live gauges are dropped by ``child_exit``."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# CPU speeds: a first token in tens of milliseconds to a minute, a token in 5 ms to 2 s.
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
TOKEN_GAP = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
BATCH = (1, 2, 4, 8, 16, 32, 64)
MODEL = ["model_name"]

REQUESTS = Counter(
    "textgen:http_requests", "HTTP requests by route, status and model",
    ["route", "method", "status", "model_name"],
)  # fmt: skip
REJECTED = Counter(
    "textgen:request_rejections", "Requests refused before they ran, by reason", ["reason"]
)
ERRORS = Counter("textgen:request_errors", "Requests that failed on the server", ["route"])
E2E = Histogram(
    "textgen:e2e_request_latency_seconds", "From arrival to the last byte", MODEL, buckets=LATENCY
)
TTFT = Histogram(
    "textgen:time_to_first_token_seconds", "From submission to the first token", MODEL,
    buckets=LATENCY,
)  # fmt: skip
ITL = Histogram(
    "textgen:inter_token_latency_seconds", "Between a sequence's tokens", MODEL, buckets=TOKEN_GAP
)
QUEUE = Histogram(
    "textgen:request_queue_time_seconds", "Waiting before the first step", MODEL, buckets=LATENCY
)
BATCH_SIZE = Histogram(
    "textgen:iteration_batch_size", "Sequences per decode step", MODEL, buckets=BATCH
)
PROMPT = Counter("textgen:prompt_tokens", "Prompt tokens admitted", MODEL)
CACHED = Counter("textgen:prefix_cache_hit_tokens", "Prompt tokens reused from the cache", MODEL)
GENERATED = Counter("textgen:generation_tokens", "Tokens generated", MODEL)
DRAFTED = Counter("textgen:spec_decode_num_draft_tokens", "Draft tokens checked", MODEL)
KEPT = Counter("textgen:spec_decode_num_accepted_tokens", "Draft tokens that were right", MODEL)
SUBMITTED = Counter("textgen:requests_submitted", "Requests queued on an engine", MODEL)
CANCELLED = Counter("textgen:requests_cancelled", "Requests withdrawn unfinished", MODEL)
WAITING = Gauge(
    "textgen:num_requests_waiting", "Requests queued", MODEL, multiprocess_mode="livesum"
)
RUNNING = Gauge(
    "textgen:num_requests_running", "Sequences in the batch", MODEL, multiprocess_mode="livesum"
)
PENDING = Gauge(
    "textgen:pending_tokens", "Tokens admitted requests may still generate", MODEL,
    multiprocess_mode="livesum",
)  # fmt: skip
PREFIX = Gauge(
    "textgen:prefix_cache_tokens", "Tokens held in the prefix cache", MODEL,
    multiprocess_mode="livesum",
)  # fmt: skip
LOAD_TIME = Gauge(
    "textgen:model_load_seconds", "How long the model took to load, per worker", MODEL,
    multiprocess_mode="liveall",
)  # fmt: skip
RSS = Gauge(
    "textgen:process_resident_memory_bytes", "Resident memory per worker",
    multiprocess_mode="liveall",
)  # fmt: skip


class PrometheusRecorder:
    """An engine's reports as Prometheus samples (the engine's Recorder protocol)."""

    def __init__(self, model: str) -> None:
        self.ttft = TTFT.labels(model)
        self.itl = ITL.labels(model)
        self.queue = QUEUE.labels(model)
        self.batch = BATCH_SIZE.labels(model)
        self.prompt = PROMPT.labels(model)
        self.cached_tokens = CACHED.labels(model)
        self.generated = GENERATED.labels(model)
        self.drafts = DRAFTED.labels(model)
        self.kept = KEPT.labels(model)
        self.submissions = SUBMITTED.labels(model)
        self.cancellations = CANCELLED.labels(model)
        self.waiting = WAITING.labels(model)
        self.running = RUNNING.labels(model)
        self.pending = PENDING.labels(model)
        self.prefix = PREFIX.labels(model)

    def submitted(self) -> None:
        self.submissions.inc()

    def rejected(self, reason: str) -> None:
        """Counted once per HTTP answer instead, with every other reason (count_request)."""

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        self.queue.observe(queue_s)
        self.prompt.inc(prompt_tokens)

    def cached(self, tokens: int) -> None:
        self.cached_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def joined(self, rows: int) -> None:
        self.generated.inc(rows)

    def step(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.generated.inc(tokens)

    def drafted(self, guessed: int, kept: int) -> None:
        self.drafts.inc(guessed)
        self.kept.inc(kept)

    def cancelled(self) -> None:
        self.cancellations.inc()

    def load(
        self, queued: int, running: int, pending_tokens: int, prefix_tokens: int, prefix_bytes: int
    ) -> None:
        self.waiting.set(queued)
        self.running.set(running)
        self.pending.set(pending_tokens)
        self.prefix.set(prefix_tokens)


def exposition() -> tuple[bytes, str]:
    """The text format of every metric, summed over the workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def count_request(line: dict[str, Any], rejection: str | None) -> None:
    """One HTTP request's samples, from its log line (textgen.api.observe)."""
    model = str(line.get("model") or "")
    REQUESTS.labels(line["route"], line["method"], str(line["status"]), model).inc()
    if rejection is not None:
        REJECTED.labels(rejection).inc()
    if line["status"] >= 500:
        ERRORS.labels(line["route"]).inc()
    if model and "," not in model:
        E2E.labels(model).observe(line["duration_s"])
    RSS.set(resident_bytes())


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
