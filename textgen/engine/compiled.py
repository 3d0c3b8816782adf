"""Running the compiled decoder (textgen/models/compiled.py) over the running batch's cache."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.engine.decode import rotary_tables
from textgen.engine.kvcache import BatchCache
from textgen.models.architecture import cache_shape, family

# Measured on AVX-512 (MKL): with key columns a multiple of 16 every score is the same whatever
# the number of columns; otherwise 70 of 504 shapes differed in their last scores.
KEY_BLOCK = 16


class CompiledForward:
    """New tokens for every row through the compiled program: a decode step (one token per
    row), a prefill (the prompts, left-padded) or a draft to check, with the same arguments as
    a DecodeStep. The cache grows by the new columns.
    """

    def __init__(self, model: Any, program: Any) -> None:
        self.program = program
        self.layers, self.kv_heads, self.head_dim = cache_shape(model.config)
        # The KV cache buffers' type it was compiled for (compiled.open_package).
        self.cache_dtype: torch.dtype = program.cache_dtype
        self.model = model
        self.learned_positions = family(model.config) == "gpt2"
        if not self.learned_positions:
            attention = model.model.layers[0].self_attn
            self.rotary_dim = getattr(attention, "rotary_ndims", self.head_dim)
        # The rotary cos and sin of positions 0, 1, ... (grown when a later one is wanted): a
        # step looks its positions up (computing them took 0.06 ms of a 7 ms one-row step).
        self.rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin of ``positions`` [*, rotary_dim], the same values bit for bit
        as rotary_tables computes for them (each an elementwise function of its position)."""
        needed = int(positions.max()) + 1
        if self.rotary_table is None or needed > len(self.rotary_table[0]):
            size = max(needed, 2 * len(self.rotary_table[0]) if self.rotary_table else 512)
            rotary = self.model.model.rotary_emb
            self.rotary_table = rotary_tables(torch.arange(size), rotary, self.rotary_dim)
        cos, sin = self.rotary_table
        return cos[positions], sin[positions]

    def embedded(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The program's inputs before the mask: the new tokens' embeddings and (families with
        rotary embeddings) the rotary tables of their positions."""
        if self.learned_positions:
            inner = self.model.transformer
            return (inner.wte(ids) + inner.wpe(positions),)
        return (self.model.model.embed_tokens(ids), *self.rotary(positions))

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
        # Attention runs over whole blocks of KEY_BLOCK columns (the rest masked): the score
        # matmul takes other kernels for a last partial block, so a row's scores would depend
        # on how many columns the step has (its prompt whole or split, its batch's lengths).
        span = -(-columns // KEY_BLOCK) * KEY_BLOCK
        cache.make_room(self.layers, rows, self.kv_heads, self.head_dim, span, self.cache_dtype)
        visible = F.pad(mask.bool(), (0, span - columns))[:, None, None, :]
        new = torch.arange(past, columns)
        if tokens > 1:
            # Causal among the new tokens; each also sees its own column, so a padding
            # position (which nothing else attends to) never has an empty softmax.
            column = torch.arange(span)[None, :]
            visible = (visible & (column <= new[:, None])) | (column == new[:, None])
        keys = [slot.key_buffer for slot in cache.slots]
        values = [slot.value_buffer for slot in cache.slots]
        logits = self.program(*self.embedded(ids, positions), visible, keys, values, new, wanted)
        for slot in cache.slots:
            slot.length = columns
        return logits
