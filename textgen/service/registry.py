"""The per-worker registry: which models are configured, loading state, and their runners."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from textgen.config import Settings
from textgen.engine.events import Failed, Finished
from textgen.engine.grammar import GrammarLimits
from textgen.engine.runner import Limits, ModelRunner
from textgen.engine.scheduler import Engine, EngineLimits
from textgen.engine.submission import Submission
from textgen.errors import ModelsNotReady, QueueFull, UnknownModel, without_paths
from textgen.generation.prompts import PromptInput
from textgen.generation.strategies import GenerationParams
from textgen.models.cache import ModelCache
from textgen.models.loading import load_model
from textgen.service.prometheus import LOAD_TIME, PrometheusRecorder

log = logging.getLogger(__name__)


class ModelRegistry:
    """Loads the configured models once per worker and hands out their runners."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ModelCache(settings.model_cache)
        self.limits = Limits(
            max_prompt_tokens=settings.max_prompt_tokens,
            max_new_tokens=settings.max_new_tokens,
            default_max_new_tokens=settings.default_max_new_tokens,
            grammar=GrammarLimits(settings.max_schema_bytes, settings.grammar_timeout),
            content_special_tokens=settings.content_special_tokens,
        )
        self.engine_limits = EngineLimits(
            max_batch=settings.max_batch,
            max_requests=settings.max_queue,
            max_pending_tokens=settings.max_queue_tokens,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            draft_tokens=settings.draft_tokens,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
        )
        self._engines: dict[str, Engine] = {}
        self._state = "idle"
        self._detail = "not started"
        self._started = time.monotonic()
        self.started_at = int(time.time())
        self._ready_after: float | None = None
        self._guard = threading.Lock()
        # Set without the lock, from a signal handler (see drain): a plain bool.
        self._draining = False

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.settings.models]

    @property
    def default_name(self) -> str:
        return self.names[0]

    def status(self) -> dict[str, Any]:
        """Loading state for /health."""
        with self._guard:
            if self._draining:
                state, detail = "draining", "stopping: finishing the requests already admitted"
            else:
                state, detail = self._state, self._detail
            return {
                "status": state,
                "detail": detail,
                "models": list(self._engines),
                "ready_after_s": self._ready_after,
            }

    def _set(self, state: str, detail: str) -> None:
        with self._guard:
            self._state, self._detail = state, detail

    def start(self) -> None:
        """Load models in the configured mode (background: serve /health while loading)."""
        if self.settings.load_mode == "sync":
            self.load_all()
            return
        thread = threading.Thread(target=self._load_logged, name="textgen-loader", daemon=True)
        thread.start()

    def _load_logged(self) -> None:
        try:
            self.load_all()
        except Exception:  # the state already says why; keep the worker up to report it
            log.exception("model loading failed")

    def load_all(self) -> None:
        """Load, and optionally warm up, every configured model in order."""
        specs = self.settings.models
        try:
            for number, spec in enumerate(specs, 1):
                self._set("loading", f"loading model {spec.name!r} ({number}/{len(specs)})")
                loaded = load_model(
                    spec,
                    self.cache,
                    self.settings.hub_probe_timeout,
                    self.settings.compile,
                    self.settings.deterministic,
                )
                runner = ModelRunner(loaded, self.limits)
                engine = Engine(runner, self.engine_limits)
                LOAD_TIME.labels(spec.name).set(loaded.load_seconds)
                engine.start()
                if self.settings.warmup:
                    self._set("loading", f"warming up model {spec.name!r}")
                    warm_up(engine)
                engine.also_record(PrometheusRecorder(spec.name))
                with self._guard:
                    self._engines[spec.name] = engine
        except Exception as exc:
            # /health and 503s show this to anyone: no file paths (the log has them).
            self._set("failed", without_paths(str(exc)))
            raise
        with self._guard:
            self._state, self._detail = "ready", "all models loaded"
            self._ready_after = round(time.monotonic() - self._started, 3)
        log.info("ready after %.1f s: %s", self._ready_after, ", ".join(self._engines))

    def engine(self, name: str | None) -> Engine:
        """The engine serving a model name (the default model when None)."""
        name = name or self.default_name
        if name not in self.names:
            raise UnknownModel(name)
        with self._guard:
            engine = self._engines.get(name)
            if engine is None:
                raise ModelsNotReady(self._detail)
            return engine

    def refusal(self) -> QueueFull | None:
        """The 429 for any generation request while every model's queue is full (counted as a
        rejection of the default model's), or None. The worker answers it from its main loop,
        so that refusals stay fast however busy the request threads are."""
        with self._guard:
            engines = list(self._engines.values())
        if not engines or any(engine.has_room() for engine in engines):
            return None
        try:
            engines[0].check_room()
        except QueueFull as full:
            return full
        return None  # room was made meanwhile

    def retry_after(self) -> int:
        """When a request refused for want of capacity may come back: as soon as the first of
        the running requests, on any model, finishes."""
        with self._guard:
            engines = list(self._engines.values())
        return min((engine.drain_seconds() for engine in engines), default=1)

    def drain(self) -> None:
        """This worker is stopping: /readyz and /health answer 503 from now on, while admitted
        requests finish. Safe in a signal handler: it takes no lock (the interrupted thread may
        hold it), it only sets a flag."""
        self._draining = True

    def close(self) -> None:
        """Stop every engine (at process exit, or at the end of a drain): what still runs
        ends with an error event."""
        with self._guard:
            engines = list(self._engines.values())
        for engine in engines:
            engine.stop()

    def engine_metrics(self) -> dict[str, Any]:
        """Each loaded model's engine counters and latencies."""
        with self._guard:
            engines = dict(self._engines)
        return {name: engine.metrics.snapshot() for name, engine in engines.items()}

    def describe(self) -> list[dict[str, Any]]:
        """Every configured model: loaded facts, or its spec and state while loading."""
        out = []
        with self._guard:
            engines = dict(self._engines)
        for spec in self.settings.models:
            engine = engines.get(spec.name)
            if engine is not None:
                out.append({**engine.runner.loaded.info(), "status": "ready"})
            else:
                out.append({**spec.describe(), "status": self._state})
        return out


def warm_up(engine: Engine) -> None:
    """One tiny greedy generation through the engine, so the first request pays no lazy setup."""
    params = GenerationParams(strategy="greedy", do_sample=False, max_new_tokens=2)
    submission = Submission.start([engine], [PromptInput(text="Hello")], params, deadline_s=600)
    for item in submission.events(poll=1.0):
        if item is not None and isinstance(item[1], Failed):
            raise RuntimeError(f"warm-up of {engine.name!r} failed: {item[1].message}")
    assert all(isinstance(e, Finished) for e in submission.finished.values())
