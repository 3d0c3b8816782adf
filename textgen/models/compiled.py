"""The decoder of a Llama-shaped model with int8 or int4 weights, compiled ahead of time
(AOTInductor).

Eager PyTorch spends most of a one-token step here on per-operation cost and on the int8 kernel
(``_weight_int8pack_mm``: 13 ms for the embedded model's matmuls at one row). Inductor, with its
C++ GEMM templates (``max_autotune``), generates the int8 weight-only matmuls and fuses the small
operations between them: the whole one-row step takes 6.4 ms against 22 eager (bench/RESULTS.md).
Compiling takes about two minutes on two cores, so it happens once, into the model cache (like
the quantized weights), and every later start loads the package in under a second.

The program runs any number of new tokens per row over the batch's KV cache buffers (written in
place): decode steps (one token) and prefills (the prompt) use the same code. Its results are not
bit-equal to transformers' eager forward on the same int8 weights (another summation order, bf16
rounding in other places); tests bound the difference.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from textgen.models.architecture import compilable
from textgen.models.cache import ModelCache, compiler_available
from textgen.models.quantize import INT4_GROUP, Int4Linear, Int8Linear
from textgen.models.sources import damaged

log = logging.getLogger(__name__)

INDUCTOR_SETTINGS = {
    # C++ GEMM templates: int8 weight-only matmuls as generated code, not the eager kernel.
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    # Weights become constants, so the templates can lay them out for their kernels.
    "freezing": True,
}


def supports(model: Any, dtype: str) -> bool:
    """Models the compiled decoder takes (``architecture.compilable``) whose every linear layer
    holds ``dtype`` weights as quantize.py stores them: int8, or int4 with the output layer in
    int8 (which int4 keeps there)."""
    if not compilable(model.config, dtype):
        return False
    kind = Int4Linear if dtype == "int4" else Int8Linear
    projections = [
        linear
        for layer in model.model.layers
        for group in projection_groups(layer).values()
        for linear in group
    ]
    return isinstance(model.lm_head, Int8Linear) and all(
        isinstance(linear, kind) for linear in projections
    )


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


class Program(torch.nn.Module):
    """What is compiled: the decoder layers, final norm and output layer, for ``tokens`` new
    positions per row. Embedding and rotary angles are computed outside (a lookup, a few ops).

    Inputs: ``hidden`` [rows, tokens, width] (embeddings), ``cos`` and ``sin`` [rows, tokens,
    head_dim] (``sin`` with its first half negated, see decode.py), ``mask`` [rows, 1, tokens,
    columns] (True: may attend), per layer the key and value buffers [rows, kv_heads, capacity,
    head_dim], and ``columns_new`` [tokens]: the buffer columns the new keys and values go to
    (the last ones of the first ``columns``), and ``wanted`` [keep]: the new positions whose
    logits are returned (the last one for a step or a prefill, every one to check a draft).
    Output: logits [rows, keep, vocabulary].
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        config = model.config
        attention = model.model.layers[0].self_attn
        self.heads: int = int(config.num_attention_heads)
        self.kv_heads: int = int(config.num_key_value_heads)
        self.head_dim: int = int(attention.head_dim)
        self.width: int = int(config.hidden_size)
        self.scale = float(attention.scaling)
        self.eps = float(model.model.norm.variance_epsilon)
        self.intermediate: int = int(config.intermediate_size)
        self.layer_count = len(model.model.layers)
        for index, layer in enumerate(model.model.layers):
            for name, group in projection_groups(layer).items():
                self.fuse(f"{name}{index}", *group)
            post = layer.post_attention_layernorm
            self.register_buffer(f"norm_in{index}", layer.input_layernorm.weight.detach())
            self.register_buffer(f"norm_post{index}", post.weight.detach())
        self.register_buffer("norm", model.model.norm.weight.detach())
        self.fuse("head", model.lm_head)

    def fuse(self, name: str, *linears: Int8Linear | Int4Linear) -> None:
        """One matmul for layers that read the same input (exact: each output row keeps its
        own weights and scales; int4 parts are whole blocks of 64 rows)."""
        parts = [stored(linear) for linear in linears]
        int4 = isinstance(linears[0], Int4Linear)  # scales and zero points [groups, rows, 2]
        self.register_buffer(f"{name}_w", torch.cat([weight for weight, _ in parts]))
        scale = torch.cat([scale for _, scale in parts], dim=1 if int4 else 0)
        self.register_buffer(f"{name}_s", scale.contiguous())
        biases = [linear.bias for linear in linears]
        if any(bias is not None for bias in biases):
            filled = [
                bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])
                for bias, (weight, _) in zip(biases, parts, strict=True)
            ]
            self.register_buffer(f"{name}_b", torch.cat(filled))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        weight, scale = getattr(self, f"{name}_w"), getattr(self, f"{name}_s")
        if weight.dtype == torch.uint8:  # int4, packed two to a byte
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, INT4_GROUP, scale)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, weight, scale)
        out = out.float()
        bias = getattr(self, f"{name}_b", None)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], -1)

    def rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = getattr(self, name)
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        columns_new: torch.Tensor,
        wanted: torch.Tensor,
    ) -> torch.Tensor:
        rows, tokens = hidden.shape[0], hidden.shape[1]
        columns = mask.shape[-1]
        half = self.head_dim // 2
        query_key = (self.heads + self.kv_heads) * self.head_dim
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        for index in range(self.layer_count):
            x = self.rms_norm(hidden, f"norm_in{index}")
            projected = self.linear(x, f"qkv{index}")
            both = projected[..., :query_key].reshape(rows, tokens, -1, self.head_dim)
            both = both * cos + both.roll(half, dims=-1) * sin
            query = both[:, :, : self.heads].transpose(1, 2)
            key = both[:, :, self.heads :].transpose(1, 2)
            value = projected[..., query_key:].reshape(rows, tokens, -1, self.head_dim)
            key_buffer, value_buffer = keys[index], values[index]
            key_buffer.index_copy_(2, columns_new, key)
            value_buffer.index_copy_(2, columns_new, value.transpose(1, 2))
            out = F.scaled_dot_product_attention(
                query,
                key_buffer[:, :, :columns],
                value_buffer[:, :, :columns],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            out = out.transpose(1, 2).reshape(rows, tokens, -1)
            hidden = hidden + self.linear(out, f"o{index}")
            x = self.rms_norm(hidden, f"norm_post{index}")
            gate_up = self.linear(x, f"gate_up{index}")
            gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
            hidden = hidden + self.linear(F.silu(gate) * up, f"down{index}")
        return self.linear(self.rms_norm(hidden.index_select(1, wanted), "norm"), "head")


def stored(linear: Int8Linear | Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized layer's weights (one row per output) and scales."""
    if isinstance(linear, Int4Linear):
        return linear.packed, linear.scale_zero
    return linear.weight_int8, linear.scale


def example_inputs(program: Program, rows: int = 8, tokens: int = 2) -> tuple[Any, ...]:
    """Inputs of the shapes the program is exported with (every size is declared dynamic).

    Their 16 rows x tokens are the size the matmul templates are tuned for: 16 decoding rows
    (TEXTGEN_MAX_BATCH's default). Tuned for 6 instead, a 16-row step took 7-8% longer here
    (46.8 against 43.0 ms at 40 columns) and one row the same."""
    capacity = tokens + 5
    buffers = [
        torch.zeros(rows, program.kv_heads, capacity, program.head_dim)
        for _ in range(program.layer_count)
    ]
    return (
        torch.zeros(rows, tokens, program.width),
        torch.ones(rows, tokens, program.head_dim),
        torch.zeros(rows, tokens, program.head_dim),
        torch.ones(rows, 1, tokens, tokens + 1, dtype=torch.bool),
        buffers,
        [buffer.clone() for buffer in buffers],
        torch.arange(1, tokens + 1),
        torch.arange(tokens),
    )


def compile_program(model: Any, target: Path) -> None:
    """Export and compile the model's Program into ``target`` (written whole, then renamed)."""
    from torch.export import Dim

    program = Program(model).eval()
    rows, tokens = Dim("rows", min=1, max=4096), Dim("tokens", min=1, max=1 << 16)
    keep = Dim("keep", min=1, max=1 << 16)
    capacity, columns = Dim("capacity", min=2, max=1 << 20), Dim("columns", min=2, max=1 << 20)
    per_layer = [{0: rows, 2: capacity}] * program.layer_count
    shapes = (
        {0: rows, 1: tokens},
        {0: rows, 1: tokens},
        {0: rows, 1: tokens},
        {0: rows, 2: tokens, 3: columns},
        per_layer,
        per_layer,
        {0: tokens},
        {0: keep},
    )
    with torch.no_grad():
        exported = torch.export.export(program, example_inputs(program), dynamic_shapes=shapes)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.stem}.{os.getpid()}.partial.pt2")
    torch._inductor.aoti_compile_and_package(
        exported, package_path=str(staging), inductor_configs=dict(INDUCTOR_SETTINGS)
    )
    os.replace(staging, target)


def load_program(model: Any, model_dir: Path, dtype: str, cache: ModelCache) -> Any | None:
    """The compiled program for ``model`` in ``dtype`` (compiled into the cache the first
    time), or None when the model or the machine cannot have one."""
    if not supports(model, dtype):
        return None
    if not compiler_available():
        log.warning("no C++ compiler (c++ or $CXX): the %s decoder runs uncompiled, slower", dtype)
        return None
    target = cache.compiled_path(model_dir, dtype)
    with cache.lock(f"compile-{target.name}"):
        if not target.is_file():
            log.info(
                "compiling the %s decoder of %s: once, about 1.5-3.5 minutes on 2 cores (a C++ "
                "build; later starts load it from the cache)",
                dtype, model_dir.name,
            )  # fmt: skip
            started = time.monotonic()
            compile_program(model, target)
            log.info("compiled decoder written to %s (%.0f s)", target, time.monotonic() - started)
    try:
        return torch._inductor.aoti_load_package(str(target))
    except Exception as exc:
        raise damaged(target, exc) from exc
