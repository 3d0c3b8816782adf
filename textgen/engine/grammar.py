"""Constrained decoding: only tokens that keep the output valid JSON (or schema-valid) follow."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from textgen.engine.jsonclose import closing_suffix
from textgen.errors import QueueFull, RequestRejected

# xgrammar's messages start "[hh:mm:ss] /project/cpp/file.cc:123: ".
SOURCE_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")
# Schemas waiting for the compiler, beyond which a request is told to come back later.
QUEUED_COMPILES = 4


@dataclass(frozen=True)
class GrammarLimits:
    """What one schema may cost: its size, its compile time, and the compiled grammars kept."""

    max_schema_bytes: int = 65536
    timeout: float = 10.0
    cache_bytes: int = 64 << 20


# When the budget left is barely enough to spell the shortest completion of what an output has
# written (its length in characters, a bound on the tokens it takes, plus CLOSING_MARGIN), the
# output prefers the tokens that spell it, so it ends as complete JSON instead of being cut by
# max_tokens. Beyond CLOSING_WINDOW tokens left, nothing is checked (the scan costs time).
CLOSING_WINDOW = 64
# A string may end inside a multi-byte character, whose remaining bytes come first.
CLOSING_MARGIN = 4
CLOSING_CHARS = frozenset('"{}[]:,0n')
# Subtracted from every other token's logit in the window: the grammar still decides what is
# allowed, this only decides which of the allowed tokens win.
CLOSING_PREFERENCE = 1e4


@dataclass(frozen=True)
class TokenTexts:
    """Each token's text, and the short structural tokens by text (for closing JSON)."""

    texts: list[str]
    structural: dict[str, list[int]]

    @classmethod
    def of(cls, tokenizer: Any) -> TokenTexts:
        texts = [str(tokenizer.decode([token])) for token in range(len(tokenizer))]
        structural: dict[str, list[int]] = {}
        for token, text in enumerate(texts):
            if text and len(text) <= 8 and set(text) <= CLOSING_CHARS:
                structural.setdefault(text, []).append(token)
        return cls(texts, structural)

    def spelling(self, suffix: str) -> list[int]:
        """Tokens whose text is a non-empty prefix of ``suffix``."""
        return [t for k in range(1, len(suffix) + 1) for t in self.structural.get(suffix[:k], [])]


@dataclass(frozen=True)
class CompiledFormat:
    """A compiled response format, the model's token texts, and room to keep for the schema."""

    grammar: Any
    tokens: TokenTexts
    # Characters a schema's required top-level properties may still take (`,"key":0` each):
    # the grammar writes them after what a plain JSON completion would end with.
    reserve: int = 0


def required_reserve(schema: dict[str, Any]) -> int:
    """Room for the required top-level properties of an object schema."""
    required = schema.get("required", []) if isinstance(schema, dict) else []
    return sum(len(str(key)) + 5 for key in required)


class GrammarDeadEnd(RequestRejected):
    """The response format allows no next token: the schema cannot be satisfied from here."""

    def __init__(self) -> None:
        super().__init__(
            "the response format's JSON schema allows no value here (it cannot be satisfied)",
            "response_format",
            "schema_unsatisfiable",
        )


def plain_message(error: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    return SOURCE_PREFIX.sub("", str(error)).strip().rstrip(":") or type(error).__name__


class GrammarCompiler:
    """Compiles response formats for one model's tokenizer, one at a time on a thread of its
    own at the lowest CPU priority, so a slow schema neither holds the engine's CPU nor blocks
    the handler past its limit. xgrammar releases the GIL while it compiles and keeps compiled
    grammars in a cache bounded in bytes."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...], limits: GrammarLimits
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self.limits = limits
        self._compiler: Any = None
        self._tokens: TokenTexts | None = None
        self._pool = ThreadPoolExecutor(1, "grammar", initializer=lowest_priority)
        self._queued = threading.BoundedSemaphore(QUEUED_COMPILES)

    def compile(self, spec: str) -> CompiledFormat:
        """A compiled grammar for a response_format spec (JSON text); a 400 for a schema that
        is too large, too slow to compile, or unusable; a 429 while the compiler is busy."""
        if len(spec.encode()) > self.limits.max_schema_bytes:
            raise RequestRejected(
                f"the JSON schema has {len(spec.encode())} bytes; this server accepts at most "
                f"{self.limits.max_schema_bytes}",
                "response_format",
                "schema_too_large",
            )
        if not self._queued.acquire(blocking=False):
            raise QueueFull("the JSON-schema compiler is busy", math.ceil(self.limits.timeout))
        try:
            if self._compiler is None:
                # Once per model, and not counted in the schema's limit: the tokenizer's
                # vocabulary is indexed (seconds for a large one, more on a busy machine).
                self._pool.submit(self._initialize).result()
            future = self._pool.submit(self._compile, spec)
        except BaseException:
            self._queued.release()
            raise
        future.add_done_callback(lambda _: self._queued.release())
        try:
            return future.result(timeout=self.limits.timeout)
        except FutureTimeout:
            raise RequestRejected(
                f"the JSON schema did not compile within {self.limits.timeout:g} s; simplify it",
                "response_format",
                "schema_too_complex",
            ) from None

    def _initialize(self) -> None:
        import xgrammar

        if self._compiler is not None:
            return
        info = xgrammar.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
        )
        self._tokens = TokenTexts.of(self.tokenizer)
        self._compiler = xgrammar.GrammarCompiler(
            info, max_threads=1, cache_limit_bytes=self.limits.cache_bytes
        )

    def _compile(self, spec: str) -> CompiledFormat:
        import xgrammar

        assert self._compiler is not None and self._tokens is not None
        schema = json.loads(spec).get("schema", {"type": "object"})
        try:
            # Compact JSON: small models otherwise spend their budget on whitespace.
            grammar = self._compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":")
            )
        except (RuntimeError, ValueError, xgrammar.InvalidJSONError) as exc:
            raise RequestRejected(
                f"the JSON schema cannot be used: {plain_message(exc)}", "response_format"
            ) from exc
        if not allows_a_start(grammar, self.vocab_size):
            raise GrammarDeadEnd()
        return CompiledFormat(grammar, self._tokens, required_reserve(schema))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def allows_a_start(grammar: Any, vocab_size: int) -> bool:
    """Whether any token may begin an output (a schema such as {"$ref": "#"} allows none)."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    xgrammar.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask)
    return bool(bitmask.any())


def lowest_priority() -> None:
    """Run this thread at nice 19 (Linux threads have their own): decode steps come first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass


class GrammarConstraint(LogitsProcessor):
    """Masks every token the grammar does not allow next; follows the tokens chosen."""

    def __init__(self, compiled: CompiledFormat, budget: int) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        self.matcher = xgrammar.GrammarMatcher(compiled.grammar)
        self.tokens = compiled.tokens
        self.reserve = compiled.reserve
        self.text = ""
        self.remaining = budget
        self.bitmask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.bitmask is None:
            self.bitmask = self.xgrammar.allocate_token_bitmask(1, scores.shape[-1])
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgrammar.apply_token_bitmask_inplace(scores, self.bitmask)
        if not bool(torch.isfinite(scores).any()):
            raise GrammarDeadEnd()
        if self.remaining <= CLOSING_WINDOW + self.reserve and not self.matcher.is_terminated():
            suffix = closing_suffix(self.text)
            wanted = self.tokens.spelling(suffix)
            if wanted and self.remaining <= len(suffix) + CLOSING_MARGIN + self.reserve:
                preference = torch.full_like(scores, -CLOSING_PREFERENCE)
                preference[:, wanted] = 0.0
                scores = scores + preference  # type: ignore[assignment]
        return scores

    def accept(self, token: int) -> None:
        self.remaining -= 1
        if not self.matcher.is_terminated():
            if not self.matcher.accept_token(token):
                raise GrammarDeadEnd()
            self.text += self.tokens.texts[token]
