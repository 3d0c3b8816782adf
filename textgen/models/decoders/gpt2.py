"""GPT-2 decoders (gpt2, distilgpt2), written out for compilation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.models.decoders.base import Program


class GPT2Program(Program):
    """LayerNorm, fused q/k/v, attention, projection; LayerNorm, GELU MLP; biases everywhere.
    Token and position embeddings are added outside (two lookups)."""

    def __init__(self, model: Any) -> None:
        config = model.config
        blocks = model.transformer.h
        heads = int(config.n_head)
        super().__init__(len(blocks), heads, heads, config.n_embd // heads, int(config.n_embd))
        self.scale = 1 / math.sqrt(self.head_dim)
        self.eps = float(config.layer_norm_epsilon)
        for index, block in enumerate(blocks):
            self.fuse(f"qkv{index}", block.attn.c_attn)
            self.fuse(f"o{index}", block.attn.c_proj)
            self.fuse(f"fc{index}", block.mlp.c_fc)
            self.fuse(f"proj{index}", block.mlp.c_proj)
            self.keep_norm(f"ln1_{index}", block.ln_1)
            self.keep_norm(f"ln2_{index}", block.ln_2)
        self.keep_norm("ln_f", model.transformer.ln_f)
        self.fuse("head", model.lm_head)

    @staticmethod
    def projections(model: Any) -> list[Any]:
        return [
            linear
            for block in model.transformer.h
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        ]

    def forward(
        self,
        hidden: torch.Tensor,  # [rows, tokens, width]: token and position embeddings
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        columns_new: torch.Tensor,
        wanted: torch.Tensor,
    ) -> torch.Tensor:
        rows, tokens = hidden.shape[0], hidden.shape[1]
        for index in range(self.layer_count):
            x = self.layer_norm(hidden, f"ln1_{index}", self.eps)
            qkv = self.linear(x, f"qkv{index}").reshape(rows, tokens, 3, self.heads, self.head_dim)
            query, key, value = (qkv[:, :, part].transpose(1, 2) for part in range(3))
            out = self.attend(index, query, key, value, mask, keys, values, columns_new, self.scale)
            hidden = hidden + self.linear(out, f"o{index}")
            x = self.layer_norm(hidden, f"ln2_{index}", self.eps)
            x = F.gelu(self.linear(x, f"fc{index}"), approximate="tanh")
            hidden = hidden + self.linear(x, f"proj{index}")
        return self.linear(
            self.layer_norm(hidden.index_select(1, wanted), "ln_f", self.eps), "head"
        )
