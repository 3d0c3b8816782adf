"""Turning a request's prompt or messages into model input text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ChatTemplater(Protocol):
    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class PromptError(ValueError):
    """A prompt cannot be built for this model."""


@dataclass(frozen=True)
class PromptInput:
    """One prompt as the client sent it: plain text, or chat messages."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    chat: bool = False
    token_ids: tuple[int, ...] | None = None  # already tokenized (OpenAI completions allow it)

    @property
    def is_chat(self) -> bool:
        return self.chat or self.messages is not None

    def conversation(self) -> list[dict[str, str]]:
        """The message list the chat template is applied to."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]


def render_prompt(tokenizer: ChatTemplater, prompt: PromptInput, model_name: str) -> str:
    """The exact text fed to the model; chat prompts go through the tokenizer's template."""
    if not prompt.is_chat:
        return prompt.text or ""
    if not tokenizer.chat_template:
        raise PromptError(
            f"model {model_name!r} has no chat template; send a plain prompt without chat/messages"
        )
    text = tokenizer.apply_chat_template(
        prompt.conversation(), add_generation_prompt=True, tokenize=False
    )
    return str(text)
