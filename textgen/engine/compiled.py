"""Running the compiled decoder (textgen/models/compiled.py) over the running batch's cache."""

from __future__ import annotations

from typing import Any

import torch

from textgen.engine.decode import rotary_tables
from textgen.engine.kvcache import BatchCache


class CompiledForward:
    """New tokens for every row through the compiled program: a decode step (one token per
    row), a prefill (the prompts, left-padded) or a draft to check, with the same arguments as
    a DecodeStep. The cache grows by the new columns.
    """

    def __init__(self, model: Any, program: Any) -> None:
        inner = model.model
        self.program = program
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        attention = inner.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = model.config.num_key_value_heads
        self.layers = len(inner.layers)

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchCache
    ) -> torch.Tensor:
        """The logits of each row's last position [rows, vocabulary]. ``ids`` and ``positions``
        [rows, tokens]; ``mask`` [rows, columns] covers the cache's columns and then the new
        ones."""
        return self.run(ids, positions, mask, cache, torch.tensor([ids.shape[1] - 1]))[:, 0]

    def every(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchCache
    ) -> torch.Tensor:
        """The logits of every new position [rows, tokens, vocabulary]."""
        return self.run(ids, positions, mask, cache, torch.arange(ids.shape[1]))

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: BatchCache,
        wanted: torch.Tensor,
    ) -> torch.Tensor:
        rows, tokens = ids.shape
        columns = mask.shape[1]
        past = columns - tokens
        cache.make_room(self.layers, rows, self.kv_heads, self.head_dim, columns)
        hidden = self.embed(ids)
        cos, sin = rotary_tables(positions, self.rotary, self.head_dim)
        visible = mask.bool()[:, None, None, :]
        new = torch.arange(past, columns)
        if tokens > 1:
            # Causal among the new tokens; each also sees its own column, so a padding
            # position (which nothing else attends to) never has an empty softmax.
            column = torch.arange(columns)[None, :]
            visible = (visible & (column <= new[:, None])) | (column == new[:, None])
        keys = [slot.key_buffer for slot in cache.slots]
        values = [slot.value_buffer for slot in cache.slots]
        logits = self.program(hidden, cos, sin, visible, keys, values, new, wanted)
        for slot in cache.slots:
            slot.set_length(columns)
        return logits
