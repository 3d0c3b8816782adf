"""Llama-shaped decoders (Llama, SmolLM2, TinyLlama, Qwen2), written out for compilation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.models.decoders.base import Program


def projection_groups(layer: Any) -> dict[str, tuple[Any, ...]]:
    """A decoder layer's projections, grouped as the program runs them: layers that read the
    same input are one matmul (q/k/v, gate/up)."""
    attention, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": (attention.q_proj, attention.k_proj, attention.v_proj),
        "o": (attention.o_proj,),
        "gate_up": (mlp.gate_proj, mlp.up_proj),
        "down": (mlp.down_proj,),
    }


class LlamaProgram(Program):
    """RMSNorm, q/k/v with rotary embeddings, attention, o; RMSNorm, SiLU-gated MLP."""

    def __init__(self, model: Any) -> None:
        config = model.config
        attention = model.model.layers[0].self_attn
        super().__init__(
            len(model.model.layers),
            int(config.num_attention_heads),
            int(config.num_key_value_heads),
            int(attention.head_dim),
            int(config.hidden_size),
        )
        self.rotary_dim = self.head_dim
        self.scale = float(attention.scaling)
        self.eps = float(model.model.norm.variance_epsilon)
        self.intermediate: int = int(config.intermediate_size)
        for index, layer in enumerate(model.model.layers):
            for name, group in projection_groups(layer).items():
                self.fuse(f"{name}{index}", *group)
            self.keep_norm(f"norm_in{index}", layer.input_layernorm)
            self.keep_norm(f"norm_post{index}", layer.post_attention_layernorm)
        self.keep_norm("norm", model.model.norm)
        self.fuse("head", model.lm_head)

    @staticmethod
    def projections(model: Any) -> list[Any]:
        return [
            linear
            for layer in model.model.layers
            for group in projection_groups(layer).values()
            for linear in group
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
            x = self.rms_norm(hidden, f"norm_in{index}", self.eps)
            projected = self.linear(x, f"qkv{index}")
            out = self.rotary_attention(index, projected, cos, sin, mask, keys, values, columns_new)
            hidden = hidden + self.linear(out, f"o{index}")
            x = self.rms_norm(hidden, f"norm_post{index}", self.eps)
            gate_up = self.linear(x, f"gate_up{index}")
            gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
            hidden = hidden + self.linear(F.silu(gate) * up, f"down{index}")
        return self.linear(self.rms_norm(hidden.index_select(1, wanted), "norm", self.eps), "head")
