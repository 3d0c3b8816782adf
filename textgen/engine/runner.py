"""Checking a request against one model: its tokens, budget and settings, before any work."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any

from textgen.engine.grammar import GrammarCompiler, GrammarLimits
from textgen.errors import RequestRejected, context_exceeded
from textgen.generation.prompts import (
    PromptError,
    PromptInput,
    SpecialTokensInContent,
    render_segments,
)
from textgen.generation.strategies import GenerationParams
from textgen.models.loading import LoadedModel


@dataclass(frozen=True)
class Limits:
    """Per-request caps that need the tokenizer to check."""

    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    grammar: GrammarLimits = GrammarLimits()
    # A message content that spells a special token: "escape" (tokenized as plain text) or
    # "refuse" (a 400).
    content_special_tokens: str = "escape"


@dataclass
class Job:
    """A request checked against one model: its prompt token ids and final settings."""

    encoded: list[list[int]]
    params: GenerationParams
    grammar: Any = None  # the compiled response format, when there is one

    @property
    def rows(self) -> int:
        """Sequences it decodes: each beam is one, each of n samples is one."""
        params = self.params
        per_prompt = params.num_beams if params.num_beams > 1 else params.num_return_sequences
        return len(self.encoded) * per_prompt

    @property
    def tokens_budget(self) -> int:
        """Tokens its rows may generate in all."""
        assert self.params.max_new_tokens is not None
        return self.rows * self.params.max_new_tokens


class ModelRunner:
    """Checks requests against one model."""

    def __init__(self, loaded: LoadedModel, limits: Limits) -> None:
        self.loaded = loaded
        self.limits = limits
        self.grammars = GrammarCompiler(
            loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids, limits.grammar
        )
        tokenizer = loaded.tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        self.specials = frozenset(
            [str(t) for t in tokenizer.all_special_tokens]
            + [t.content for t in added if getattr(t, "special", False)]
        )

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    def tokenize(self, prompt: PromptInput, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a prompt as the model will see them (chat template applied);
        ``add_special_tokens`` overrides whether the tokenizer adds its BOS/EOS."""
        tokenizer = self.loaded.tokenizer
        if prompt.token_ids is not None:
            if any(i >= len(tokenizer) for i in prompt.token_ids):
                raise RequestRejected(
                    f"prompt token ids must be below the vocabulary size {len(tokenizer)}",
                    "prompt",
                    "invalid_token",
                )
            return list(prompt.token_ids)
        try:
            pieces = render_segments(tokenizer, prompt, self.name, self.specials)
        except SpecialTokensInContent as exc:
            raise RequestRejected(str(exc), exc.param, "special_tokens_in_content") from exc
        except PromptError as exc:
            raise RequestRejected(str(exc), "messages", "chat_template_missing") from exc
        if len(pieces) > 1 and self.limits.content_special_tokens == "refuse":
            raise RequestRejected(
                "a message spells a special token of this model's chat template",
                "messages",
                "special_tokens_in_content",
            )
        # A chat template already writes the special tokens it wants.
        special = not prompt.is_chat if add_special_tokens is None else add_special_tokens
        ids: list[int] = []
        for number, (text, from_client) in enumerate(pieces):
            # The client's text never becomes special tokens (the template's own parts do).
            encoded = tokenizer(
                text,
                add_special_tokens=special and number == 0,
                split_special_tokens=from_client,
            )
            ids.extend(encoded["input_ids"])
        return ids

    def encode(self, prompts: list[PromptInput]) -> list[list[int]]:
        """Token ids of each prompt; rejects prompts over the caps."""
        encoded = []
        for prompt in prompts:
            ids = self.tokenize(prompt)
            if not ids:
                raise RequestRejected("prompt encodes to no tokens", "prompt", "empty_prompt")
            usable = self.limits.max_prompt_tokens
            if self.loaded.context_length is not None:
                usable = min(usable, self.loaded.context_length)
            if len(ids) > usable:
                raise context_exceeded(usable, len(ids), None, prompt.is_chat)
            encoded.append(ids)
        return encoded

    def new_token_budget(
        self, params: GenerationParams, longest: int, until_context: bool = False
    ) -> int:
        """max_new_tokens after defaults, the max_length alias and the model's context.

        ``until_context``: without max_new_tokens, generate up to the server's cap or the end of
        the model's context, whichever comes first (OpenAI chat semantics).
        """
        if params.max_length is not None:
            budget = params.max_length - longest
            if budget < 1:
                raise RequestRejected(
                    f"max_length ({params.max_length}) counts the prompt, which already has "
                    f"{longest} tokens; raise it or use max_new_tokens",
                    "max_length",
                )
            budget = min(budget, self.limits.max_new_tokens)
        elif params.max_new_tokens is None and until_context:
            room = (self.loaded.context_length or longest + self.limits.max_new_tokens) - longest
            budget = max(1, min(self.limits.max_new_tokens, room))
        else:
            budget = params.max_new_tokens or self.limits.default_max_new_tokens
        context = self.loaded.context_length
        if context is not None and longest + budget > context:
            raise context_exceeded(context, longest, budget, False)
        return budget

    def prepare(
        self, prompts: list[PromptInput], params: GenerationParams, until_context: bool = False
    ) -> Job:
        """Check a request against this model and fix its settings; no generation yet."""
        encoded = self.encode(prompts)
        vocab = len(self.loaded.tokenizer)
        if any(token >= vocab for token, _ in params.logit_bias):
            raise RequestRejected(
                f"logit_bias token ids must be below the vocabulary size {vocab}", "logit_bias"
            )
        budget = self.new_token_budget(params, max(len(ids) for ids in encoded), until_context)
        if params.do_sample and params.seed is None:
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        grammar = None
        if params.response_format is not None:
            grammar = self.grammars.compile(params.response_format)
        return Job(encoded, dataclasses.replace(params, max_new_tokens=budget), grammar=grammar)
