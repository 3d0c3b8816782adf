"""Turning a request's prompt or messages into model input text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from textgen.generation.tools import Tool, generic_turns


class ChatTemplater(Protocol):
    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class PromptError(ValueError):
    """A prompt cannot be built for this model."""


class SpecialTokensInContent(PromptError):
    """A message's content spells a special token, and this server refuses that (or a tool
    definition, a call or a name does, which is refused always)."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


# Stand-ins for message contents while the template renders: private-use characters that no
# template writes, so the rendered text splits back into the template's parts and the client's.
HOLDER = "\ue000{}\ue001"
HELD = re.compile("\ue000([0-9]+)\ue001")


@dataclass(frozen=True)
class PromptInput:
    """One prompt as the client sent it: plain text, or chat messages."""

    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    chat: bool = False
    token_ids: tuple[int, ...] | None = None  # already tokenized (OpenAI completions allow it)
    tools: tuple[Tool, ...] = ()  # functions offered to the model

    @property
    def is_chat(self) -> bool:
        return self.chat or self.messages is not None

    def conversation(self) -> list[dict[str, Any]]:
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
    conversation = prompt.conversation()
    extra: dict[str, Any] = {}
    uses_tools = bool(prompt.tools) or any(
        m["role"] == "tool" or m.get("tool_calls") for m in conversation
    )
    if uses_tools and "tools" in str(tokenizer.chat_template):
        # The template renders tools and calls itself (Qwen2, Llama 3.1, Hermes...): calls'
        # arguments as objects, as transformers' templates expect them.
        conversation = [with_parsed_arguments(m) for m in conversation]
        extra["tools"] = [tool.openai() for tool in prompt.tools] or None
    elif uses_tools:
        conversation = generic_turns(conversation, prompt.tools)
    text = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False, **extra
    )
    return str(text)


def with_parsed_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose tool calls carry their arguments as objects, not JSON text."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def render_segments(
    tokenizer: ChatTemplater, prompt: PromptInput, model_name: str, specials: frozenset[str]
) -> list[tuple[str, bool]]:
    """The model input as (text, written by the client) pieces. Message contents that spell a
    special token (``specials``) come out as pieces of their own, to be tokenized as plain text:
    otherwise "hi<|im_end|><|im_start|>system..." in a user message would end the turn and fake
    a system one. Everything else is one piece, tokenized as before."""
    if prompt.is_chat:
        check_beside_contents(prompt, specials)
    if not prompt.is_chat or not spells_special(prompt, specials):
        return [(render_prompt(tokenizer, prompt, model_name), False)]
    contents: list[str] = []

    def hold(message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, str) or not content:
            return message
        contents.append(content)
        return {**message, "content": HOLDER.format(len(contents) - 1)}

    messages = tuple(hold(m) for m in prompt.conversation())
    held = render_prompt(tokenizer, PromptInput(messages=messages, tools=prompt.tools), model_name)
    pieces: list[tuple[str, bool]] = []
    seen: list[int] = []
    for number, part in enumerate(HELD.split(held)):
        if number % 2:
            seen.append(int(part))
            pieces.append((contents[int(part)], True))
        elif part:
            pieces.append((part, False))
    if sorted(seen) != list(range(len(contents))):
        # The template changed a content (trimmed, split...): it cannot be kept apart safely.
        raise SpecialTokensInContent(
            "a message spells a special token, and this model's chat template does not keep "
            "contents whole; remove the special token"
        )
    return pieces


def check_beside_contents(prompt: PromptInput, specials: frozenset[str]) -> None:
    """Refuse a special token spelled where the template renders client text outside a
    message's content (tool definitions, earlier calls' arguments, names): that text cannot be
    kept apart from the template's own, so it would become the real token."""
    tools = json.dumps([tool.openai() for tool in prompt.tools], ensure_ascii=False)
    others = json.dumps(
        [{k: v for k, v in m.items() if k != "content"} for m in prompt.conversation()],
        ensure_ascii=False,
    )
    for text, param in ((tools, "tools"), (others, "messages")):
        token = next((t for t in specials if t in text), None)
        if token is not None:
            where = "a tool definition" if param == "tools" else "a message's name or tool call"
            raise SpecialTokensInContent(
                f"{where} spells the special token {token!r}; remove it", param
            )


def spells_special(prompt: PromptInput, specials: frozenset[str]) -> bool:
    """Whether any message content contains a special token's text."""
    for message in prompt.conversation():
        content = message.get("content")
        if isinstance(content, str) and any(token in content for token in specials):
            return True
    return False
