"""What every written-out decoder shares: quantized matmuls (fused where layers read the same
input), norms, and attention over the batch's KV cache buffers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.models import blockwise
from textgen.models.quantize import INT4_GROUP, BlockLinear, Int4Linear, Int8Linear


class Program(torch.nn.Module):
    """A decoder's layers, final norm and output layer over ``tokens`` new positions per row,
    with the weights of an int8 or int4 model (the embeddings are looked up outside).

    The inputs every family takes: ``mask`` [rows, 1, tokens, columns] (True: may attend), per
    layer the key and value buffers [rows, kv_heads, capacity, head_dim], ``columns_new``
    [tokens]: the buffer columns the new keys and values go to (the last ones of the first
    ``columns``), and ``wanted`` [keep]: the new positions whose logits are returned (the last
    one for a step or a prefill, every one to check a draft). Output: logits [rows, keep,
    vocabulary]. Families with rotary embeddings also take ``cos`` and ``sin`` [rows, tokens,
    rotary_dim] (``sin`` with its first half negated, see engine/decode.py). The buffers are of
    ``cache_dtype``; new keys and values are rounded to it as they are written.
    """

    # The width of the rotary tables the program takes, or None (learned positions).
    rotary_dim: int | None = None
    # Batch-invariant attention (``attend``); False: PyTorch's fused attention, faster and not.
    invariant = True
    # Batch-invariant attention by textgen's kernel (kernels/attention.cpp), where it is built.
    kernel_attention = False
    scale: float  # of the attention scores

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache buffers' type (``cache_dtype_of``)."""
        return cache_dtype_of(self.kernel_attention)

    def __init__(self, layers: int, heads: int, kv_heads: int, head_dim: int, width: int) -> None:
        super().__init__()
        self.layer_count, self.heads, self.kv_heads = layers, heads, kv_heads
        self.head_dim, self.width = head_dim, width
        self.rows: dict[str, int] = {}  # output rows of each matmul (textgen's are packed by 8)

    @staticmethod
    def projections(model: Any) -> list[Any]:
        """Every projection of the decoder layers (the output layer apart)."""
        raise NotImplementedError

    def fuse(self, name: str, *linears: Int8Linear | Int4Linear | BlockLinear) -> None:
        """One matmul for layers that read the same input (exact: each output row keeps its
        own weights and scales; int4 parts are whole blocks of 64 rows, textgen's of 8)."""
        if len({type(linear) for linear in linears}) > 1:
            raise ValueError(f"{name}: joined layers must share a format, not {linears}")
        parts = [stored(linear) for linear in linears]
        self.register_buffer(f"{name}_w", torch.cat([weight for weight, _ in parts]))
        if not isinstance(linears[0], BlockLinear):  # whose scales are in its weights
            int4 = isinstance(linears[0], Int4Linear)  # scale, zero point [groups, rows, 2]
            scale = torch.cat([s for _, s in parts if s is not None], dim=1 if int4 else 0)
            self.register_buffer(f"{name}_s", scale.contiguous())
        rows = [linear.out_features for linear in linears]
        if isinstance(linears[0], BlockLinear) and any(
            count % blockwise.GROUP for count in rows[:-1]
        ):
            raise ValueError(f"{name}: joined layers must have output rows by 8, not {rows}")
        self.rows[name] = sum(rows)
        biases = [linear.bias for linear in linears]
        if any(bias is not None for bias in biases):
            filled = [
                bias.detach().float() if bias is not None else torch.zeros(count)
                for bias, count in zip(biases, rows, strict=True)
            ]
            self.register_buffer(f"{name}_b", torch.cat(filled))

    def keep_norm(self, name: str, norm: Any) -> None:
        """A norm's weight (and a LayerNorm's bias) as buffers ``name`` and ``name_b``."""
        self.register_buffer(name, norm.weight.detach())
        if getattr(norm, "bias", None) is not None:
            self.register_buffer(f"{name}_b", norm.bias.detach())

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weight, scale = getattr(self, f"{name}_w"), getattr(self, f"{name}_s", None)
        if weight.dim() == 3:  # textgen's kernels (BlockLinear)
            out = blockwise.matmul(flat, weight, self.rows[name])
        elif weight.dtype == torch.uint8:  # PyTorch's int4, packed two to a byte
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), weight, INT4_GROUP, scale
            )
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), weight, scale)
        out = out.float()
        bias = getattr(self, f"{name}_b", None)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], -1)

    def rms_norm(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        weight = getattr(self, name)
        return F.rms_norm(x, weight.shape, weight, eps)

    def layer_norm(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        weight = getattr(self, name)
        return F.layer_norm(x, weight.shape, weight, getattr(self, f"{name}_b"), eps)

    def attend(
        self,
        index: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        columns_new: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write layer ``index``'s new keys and values ([rows, kv_heads, tokens, head_dim])
        into its buffers and attend over the first ``columns``; out [rows, tokens, width].

        Batch-invariant: a row's result does not depend on the other rows, on how many tokens
        the step computes, or on how many padding columns precede the row's own (rows are
        right-aligned in the buffers), so a request gives the same text alone, in a batch, or
        after a prefix-cache hit. Where textgen's kernels are built (``kernel_attention``) their
        attention does this by construction (kernels/attention.cpp); else, as follows.
        PyTorch's fused attention is not: its sums over the columns
        go in blocks and vector lanes that start at column 0, so they group a row's terms
        differently when padding shifts them. Here each sum runs column by column:
        ``p @ values`` (the matmul's inner loop is sequential over columns, so leading zero
        weights add nothing) and a cumulative sum for the softmax denominator. Both matmuls'
        rows (each key/value head's queries, then its weights) get 8 zero rows below them
        (``padded``): with fewer than 4 rows, or in a last block of 1-3 rows, the matmul takes
        another kernel, whose results depend on where the columns start (decode steps have
        ``heads / kv_heads`` rows) or on the row's place (measured on AVX2 and AVX-512). Its
        cost is in bench/RESULTS.md ("Reproducible outputs"); ``invariant = False``
        (TEXTGEN_DETERMINISTIC=false) takes the fused attention instead."""
        rows, tokens, columns = query.shape[0], query.shape[2], mask.shape[-1]
        key_buffer, value_buffer = keys[index], values[index]
        key_buffer.index_copy_(2, columns_new, key.to(key_buffer.dtype))
        value_buffer.index_copy_(2, columns_new, value.to(value_buffer.dtype))
        if not self.invariant:
            out = F.scaled_dot_product_attention(
                query,
                key_buffer[:, :, :columns],
                value_buffer[:, :, :columns],
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
            return out.transpose(1, 2).reshape(rows, tokens, -1)
        if self.kernel_attention:
            return blockwise.attend(query, key_buffer, value_buffer, mask, scale)
        groups = self.heads // self.kv_heads
        # [rows, kv_heads, tokens x groups, head_dim]: a kv head's queries, token by token.
        grouped = query.transpose(1, 2).unflatten(2, (self.kv_heads, groups))
        grouped = grouped.permute(0, 2, 1, 3, 4).flatten(2, 3)
        scores = torch.matmul(padded(grouped), key_buffer[:, :, :columns].transpose(-1, -2))
        scores = scores[:, :, : tokens * groups].unflatten(2, (tokens, groups)) * scale
        scores = scores.masked_fill(~mask[:, :, :, None], float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)).flatten(2, 3)
        total = weights.cumsum(-1)[..., -1:]
        out = torch.matmul(padded(weights), value_buffer[:, :, :columns])[:, :, : tokens * groups]
        out = (out / total).unflatten(2, (tokens, groups)).permute(0, 2, 1, 3, 4)
        return out.reshape(rows, tokens, -1)

    def rotary_attention(
        self,
        index: int,
        projected: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        columns_new: torch.Tensor,
    ) -> torch.Tensor:
        """Layer ``index``'s attention from its fused q/k/v projection [rows, tokens, (heads +
        2 kv_heads) * head_dim], the first ``rotary_dim`` of each query and key head turned by
        ``cos`` and ``sin`` [rows, tokens, 1, rotary_dim]; out [rows, tokens, width]."""
        rows, tokens = projected.shape[0], projected.shape[1]
        query_key = (self.heads + self.kv_heads) * self.head_dim
        both = projected[..., :query_key].reshape(rows, tokens, -1, self.head_dim)
        turned = self.rotary_dim
        if turned == self.head_dim:
            both = rotate(both, cos, sin)
        else:  # partial rotary (Phi): the rest of each head passes as it is
            both = torch.cat([rotate(both[..., :turned], cos, sin), both[..., turned:]], dim=-1)
        query = both[:, :, : self.heads].transpose(1, 2)
        key = both[:, :, self.heads :].transpose(1, 2)
        value = projected[..., query_key:].reshape(rows, tokens, -1, self.head_dim)
        return self.attend(
            index, query, key, value.transpose(1, 2), mask, keys, values, columns_new, self.scale
        )


def cache_dtype_of(kernel_attention: bool) -> torch.dtype:
    """The KV cache buffers' type of a program: float16 for textgen's attention kernel, which
    widens each value as it loads it (half the bytes a step reads: at 16 rows and 80 columns
    the attention read a GPT-2 step's 94 MB of float32 cache at about 31 GB/s, 14% of the
    step), float32 for PyTorch's attention."""
    return torch.float16 if kernel_attention else torch.float32


def padded(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [..., m, n] with 8 zero rows below: see Program.attend."""
    return torch.cat([rows, rows.new_zeros(*rows.shape[:-2], 8, rows.shape[-1])], -2)


def stored(
    linear: Int8Linear | Int4Linear | BlockLinear,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A quantized layer's weights (by output rows) and scales (None: inside the weights)."""
    if isinstance(linear, BlockLinear):
        return linear.blocks, None
    if isinstance(linear, Int4Linear):
        return linear.packed, linear.scale_zero
    return linear.weight_int8, linear.scale


def rotate(both: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings over the last dimension of ``both`` [rows, tokens, heads, dim], with
    ``cos`` and ``sin`` [rows, tokens, 1, dim] (``sin``'s first half negated)."""
    return both * cos + both.roll(both.shape[-1] // 2, dims=-1) * sin
