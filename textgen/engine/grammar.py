"""Constrained decoding: only tokens that keep the output valid JSON (or schema-valid) follow."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
from transformers import LogitsProcessor

from textgen.generation.runner import RequestRejected


class GrammarCompiler:
    """Compiles response formats for one model's tokenizer (built on first use, then cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compile(self, spec: str) -> Any:
        """A compiled grammar for a response_format spec (JSON text); a 400 for a bad schema."""
        import xgrammar

        with self._lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
            fmt = json.loads(spec)
            schema = fmt.get("schema", {"type": "object"})
            try:
                # No free whitespace: small models otherwise spend their budget on it.
                return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            except (RuntimeError, ValueError, xgrammar.InvalidJSONError) as exc:
                raise RequestRejected(
                    f"the JSON schema cannot be used: {exc}", "response_format"
                ) from exc


class GrammarConstraint(LogitsProcessor):
    """Masks every token the grammar does not allow next; follows the tokens chosen."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.bitmask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.bitmask is None:
            self.bitmask = self.xgrammar.allocate_token_bitmask(1, scores.shape[-1])
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgrammar.apply_token_bitmask_inplace(scores, self.bitmask)
        return scores

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)
