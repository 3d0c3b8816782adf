"""Prompts already computed, kept with their keys and values so a later prompt that starts the
same way (a chat template, a system prompt, a shared instruction) computes only the rest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

# A shorter match is not worth its own prefill (prompts without a match are prefilled together).
MIN_REUSE = 4

# Per layer: keys and values [1, kv heads, prompt tokens, head dim].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


def common_length(a: tuple[int, ...], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


class PrefixCache:
    """The most recently used prompts' keys and values, at most ``max_tokens`` tokens of them.

    Owned by one engine thread, so not locked.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: list[int]) -> tuple[int, LayerKV] | None:
        """The longest stored start of ``prompt`` (at least MIN_REUSE tokens, and never the
        whole prompt: its last token must run to give the next token's logits)."""
        best, length = None, 0
        for key in self._entries:
            common = common_length(key, prompt)
            if common > length:
                best, length = key, common
        length = min(length, len(prompt) - 1)
        if best is None or length < MIN_REUSE:
            return None
        self._entries.move_to_end(best)
        return length, self._entries[best]

    def store(self, prompt: list[int], copy: Callable[[], LayerKV]) -> None:
        """Keep ``prompt``'s keys and values: ``copy`` makes copies of exactly its columns,
        called only when the prompt is worth keeping and not kept yet."""
        key = tuple(prompt)
        if len(key) < MIN_REUSE or len(key) > self.max_tokens:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = layers = copy()
        self.tokens += len(key)
        self.bytes += size(layers)
        while self.tokens > self.max_tokens:
            dropped, gone = self._entries.popitem(last=False)
            self.tokens -= len(dropped)
            self.bytes -= size(gone)


def size(layers: LayerKV) -> int:
    return sum(keys.nbytes + values.nbytes for keys, values in layers)
