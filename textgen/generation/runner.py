"""Checking a request against one model, and whole generate() calls (beam search)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from textgen.generation.prompts import PromptError, PromptInput, render_prompt
from textgen.generation.stopping import StopSequenceMatcher
from textgen.generation.strategies import GenerationParams
from textgen.models.loading import LoadedModel


class RequestRejected(ValueError):
    """The request cannot run on this model (too long, no chat template...); a client error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Limits:
    """Per-request caps that need the tokenizer to check."""

    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int


@dataclass
class Job:
    """A request checked against one model: its prompt token ids and final settings."""

    encoded: list[list[int]]
    params: GenerationParams
    grammar: Any = None  # the compiled response format, when there is one


@dataclass
class Output:
    """One generated continuation."""

    prompt_index: int
    index: int
    text: str
    finish_reason: str
    completion_tokens: int


class Interruption(StoppingCriteria):
    """Ends every row when ``interrupted()`` says so (client gone, deadline passed)."""

    def __init__(self, interrupted: Callable[[], bool]) -> None:
        self.interrupted = interrupted

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = self.interrupted()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)  # type: ignore[return-value]


class StopStringCriteria(StoppingCriteria):
    """Stops a row once its generated text contains a stop string (same rule as truncation)."""

    def __init__(self, tokenizer: Any, matcher: StopSequenceMatcher, prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.matcher = matcher
        self.prompt_width = prompt_width
        # A token holds at least one byte and a character at most four, so a stop string of
        # n characters lies within the last 4n tokens.
        self.window = 4 * max(len(stop) for stop in matcher.stops) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_width :][:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hits = [self.matcher.find(text) is not None for text in texts]
        return torch.tensor(hits, dtype=torch.bool)  # type: ignore[return-value]


class ModelRunner:
    """Checks requests against one model, and runs whole generate() calls for the engine."""

    def __init__(self, loaded: LoadedModel, limits: Limits) -> None:
        from textgen.engine.grammar import GrammarCompiler

        self.loaded = loaded
        self.limits = limits
        self.grammars = GrammarCompiler(
            loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids
        )

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """Token ids of a prompt as the model will see them (chat template applied)."""
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
            text = render_prompt(tokenizer, prompt, self.name)
        except PromptError as exc:
            raise RequestRejected(str(exc), "messages", "chat_template_missing") from exc
        # A chat template already writes the special tokens it wants.
        return list(tokenizer(text, add_special_tokens=not prompt.is_chat)["input_ids"])

    def encode(self, prompts: list[PromptInput]) -> list[list[int]]:
        """Token ids of each prompt; rejects prompts over the caps."""
        encoded = []
        for prompt in prompts:
            ids = self.tokenize(prompt)
            if not ids:
                raise RequestRejected("prompt encodes to no tokens", "prompt", "empty_prompt")
            if len(ids) > self.limits.max_prompt_tokens:
                raise RequestRejected(
                    f"prompt has {len(ids)} tokens; this server accepts at most "
                    f"{self.limits.max_prompt_tokens}",
                    "prompt",
                    "prompt_too_long",
                )
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
            raise RequestRejected(
                f"model {self.name!r} has a context of {context} tokens; the prompt has {longest} "
                f"and {budget} new tokens were asked for ({longest + budget} in all)",
                "prompt" if longest >= context else "max_new_tokens",
                "context_length_exceeded",
            )
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

    def run(self, job: Job, interrupted: Callable[[], bool] | None = None) -> list[Output]:
        """Run a prepared job with one generate() call (the engine uses it for beam search)."""
        params = job.params
        tokenizer = self.loaded.tokenizer
        batch = tokenizer.pad({"input_ids": job.encoded}, padding=True, return_tensors="pt")
        config = GenerationConfig(
            **params.generation_kwargs(),
            max_new_tokens=params.max_new_tokens,
            eos_token_id=None if params.ignore_eos else list(self.loaded.eos_token_ids) or None,
            pad_token_id=self.loaded.pad_token_id,
        )
        criteria = StoppingCriteriaList()
        if interrupted is not None:
            criteria.append(Interruption(interrupted))
        if params.stop:
            width = batch["input_ids"].shape[1]
            matcher = StopSequenceMatcher(params.stop)
            criteria.append(StopStringCriteria(tokenizer, matcher, width))
        with torch.inference_mode():
            sequences = self.loaded.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                generation_config=config,
                stopping_criteria=criteria,
            )
        return self.decode(sequences[:, batch["input_ids"].shape[1] :], params)

    def decode(self, generated: torch.Tensor, params: GenerationParams) -> list[Output]:
        """Text, finish reason and token count of each generated row."""
        matcher = StopSequenceMatcher(params.stop)
        eos = set() if params.ignore_eos else set(self.loaded.eos_token_ids)
        pad = self.loaded.pad_token_id
        outputs = []
        for row, tokens in enumerate(generated.tolist()):
            cut = next((i for i, token in enumerate(tokens) if token in eos), None)
            kept = tokens if cut is None else tokens[:cut]
            text, stopped = matcher.truncate(
                self.loaded.tokenizer.decode(kept, skip_special_tokens=True)
            )
            if stopped:
                # generate() pads a row that stopped early; padding is not output.
                while kept and kept[-1] == pad:
                    kept = kept[:-1]
                count, reason = len(kept), "stop"
            elif cut is not None:
                count, reason = cut + 1, "eos"
            else:
                count, reason = len(tokens), "length"
            outputs.append(
                Output(
                    prompt_index=row // params.num_return_sequences,
                    index=row % params.num_return_sequences,
                    text=text,
                    finish_reason=reason,
                    completion_tokens=count,
                )
            )
        return outputs
