"""One decode step of the running batch: one new token for every row, logits of that position.

For Llama-shaped models (Llama, SmolLM2, TinyLlama, Qwen2) the step runs the model's own
modules and weights through a straight-line loop that does only what one token needs: no mask
building from scratch, no output records, no hooks or keyword plumbing per layer. It computes
the same operations in the same order as transformers' forward (with SDPA attention), so the
logits are equal bit for bit (a test checks it); it took 5-14% less time per step here
(bench/RESULTS.md). Every other model takes transformers' forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.engine.kvcache import BatchCache
from textgen.models.architecture import llama_shaped
from textgen.models.float16 import fused_group


def decode_step_for(model: Any) -> DecodeStep:
    """The fastest exact decode step available for ``model``."""
    return LlamaDecodeStep(model) if LlamaDecodeStep.supports(model) else DecodeStep(model)


class DecodeStep:
    """transformers' forward for new positions of every row (a decode step: one each)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchCache
    ) -> torch.Tensor:
        """Logits [rows, vocab] of the last of ``ids`` [rows, tokens] at ``positions`` [rows,
        tokens]; ``mask`` [rows, columns] covers the cache and the new columns."""
        return self.forward(ids, positions, mask, cache)[:, -1, :]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: BatchCache,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Logits [rows, kept, vocab] of the last ``logits_to_keep`` positions (0: all)."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits


class LlamaDecodeStep(DecodeStep):
    """The Llama decoder for one position, written out over the model's own modules."""

    @staticmethod
    def supports(model: Any) -> bool:
        return model.config._attn_implementation == "sdpa" and llama_shaped(model.config)

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.head = model.lm_head
        self.rotary = inner.rotary_emb
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.groups = attention.num_key_value_groups
        self.heads = model.config.num_attention_heads
        self.query_key_width = (self.heads + model.config.num_key_value_heads) * self.head_dim
        # float16 weights pack q/k/v and gate/up as one matmul each: called as one here.
        self.qkv = [
            fused_group(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers
        ]
        self.gate_up = [fused_group(layer.mlp, ("gate_proj", "up_proj")) for layer in self.layers]

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchCache
    ) -> torch.Tensor:
        rows = ids.shape[0]
        hidden = self.embed(ids)  # [rows, 1, width]
        cos, sin_signed = rotary_tables(positions, self.rotary, self.head_dim)
        cos, sin_signed = cos.to(hidden.dtype)[:, None], sin_signed.to(hidden.dtype)[:, None]
        half = self.head_dim // 2
        # As transformers does: no mask at all when no row has padding (SDPA's result differs in
        # the last bits between no mask and an all-true one).
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        for layer, slot, qkv, gate_up in zip(
            self.layers, cache.slots, self.qkv, self.gate_up, strict=True
        ):
            attention = layer.self_attn
            x = rms_norm(hidden, layer.input_layernorm)
            if qkv is not None:
                projected = qkv.matmul(x)
                both = projected[..., : self.query_key_width]
                value = projected[..., self.query_key_width :]
            else:
                both = torch.cat((attention.q_proj(x), attention.k_proj(x)), dim=-1)
                value = attention.v_proj(x)
            # The rotary embedding turns query and key heads in one go: [rows, 1, heads, dim].
            both = both.view(rows, 1, -1, self.head_dim)
            both = both * cos + both.roll(half, dims=-1) * sin_signed
            query = both[:, :, : self.heads].transpose(1, 2)
            key = both[:, :, self.heads :].transpose(1, 2)
            value = value.view(rows, 1, -1, self.head_dim).transpose(1, 2)
            keys, values = slot.update(key, value)
            out = self.attend(query, keys, values, attend, attention.scaling)
            out = out.reshape(rows, 1, -1)  # one position: the heads' outputs side by side
            hidden = hidden + attention.o_proj(out)
            x = rms_norm(hidden, layer.post_attention_layernorm)
            mlp = layer.mlp
            if gate_up is not None:
                gate, up = gate_up.split(x)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            hidden = hidden + mlp.down_proj(F.silu(gate) * up)
        return self.head(rms_norm(hidden, self.norm))[:, -1, :]

    def attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """SDPA for one query per row, called as transformers calls it (the kernel's result
        depends in its last bits on the call's form)."""
        if self.groups == 1:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
        if mask is None:
            return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
        # The heads that share a key/value head attend as one group of queries (no repeats).
        rows = query.shape[0]
        grouped = query.reshape(rows, keys.shape[1], self.groups, self.head_dim)
        return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)


def rotary_tables(
    positions: torch.Tensor, rotary: Any, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary cos and sin (float32, [*positions.shape, head_dim]), the sin with
    its first half's sign flipped: rotate_half(x) * sin is x.roll(half) * that, the same
    products, so equal bit for bit, in two operations instead of five."""
    freqs = positions[..., None].float() * rotary.inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = angles.cos() * rotary.attention_scaling
    sin = angles.sin() * rotary.attention_scaling
    half = head_dim // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rms_norm(hidden: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' Llama RMSNorm: in float32 PyTorch's own (the same operations in one call:
    equal bit for bit, 16 against 26 us here), otherwise operation for operation."""
    dtype = hidden.dtype
    if dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)
