"""Phi decoders (phi-1.5, phi-2), written out for compilation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.models.decoders.base import Program


class PhiProgram(Program):
    """One LayerNorm feeding attention (rotary embeddings on the first ``rotary_dim`` of each
    head) and the GELU MLP side by side, both added to the residual; biases everywhere."""

    def __init__(self, model: Any) -> None:
        config = model.config
        layers = model.model.layers
        attention = layers[0].self_attn
        super().__init__(
            len(layers),
            int(config.num_attention_heads),
            int(config.num_key_value_heads or config.num_attention_heads),
            int(attention.head_dim),
            int(config.hidden_size),
        )
        self.rotary_dim = int(attention.rotary_ndims)
        self.scale = float(attention.scaling)
        self.eps = float(config.layer_norm_eps)
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            self.fuse(f"qkv{index}", attention.q_proj, attention.k_proj, attention.v_proj)
            self.fuse(f"o{index}", attention.dense)
            self.fuse(f"fc{index}", layer.mlp.fc1)
            self.fuse(f"proj{index}", layer.mlp.fc2)
            self.keep_norm(f"ln{index}", layer.input_layernorm)
        self.keep_norm("ln_f", model.model.final_layernorm)
        self.fuse("head", model.lm_head)

    @staticmethod
    def projections(model: Any) -> list[Any]:
        return [
            linear
            for layer in model.model.layers
            for linear in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.dense,
                layer.mlp.fc1,
                layer.mlp.fc2,
            )
        ]

    def forward(
        self,
        hidden: torch.Tensor,  # [rows, tokens, width]
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        columns_new: torch.Tensor,
        wanted: torch.Tensor,
    ) -> torch.Tensor:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        for index in range(self.layer_count):
            x = self.layer_norm(hidden, f"ln{index}", self.eps)
            projected = self.linear(x, f"qkv{index}")
            out = self.rotary_attention(index, projected, cos, sin, mask, keys, values, columns_new)
            mlp = self.linear(
                F.gelu(self.linear(x, f"fc{index}"), approximate="tanh"), f"proj{index}"
            )
            hidden = self.linear(out, f"o{index}") + mlp + hidden  # transformers' order
        return self.linear(
            self.layer_norm(hidden.index_select(1, wanted), "ln_f", self.eps), "head"
        )
