"""Weight formats: float32, bfloat16, float16 (fbgemm, in float16.py), and int8 / int4
weight-only, which are prepared once into the cache."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from textgen.models import blockwise, cpu, float16
from textgen.models.cache import ModelCache
from textgen.models.layers import linear_layers, linearize
from textgen.models.sources import ModelUnavailable, damaged

log = logging.getLogger(__name__)

# int4 weights share one scale and one zero point per group of this many input columns: the
# embedded model's Q4_1 blocks are 32 wide, so its weights survive with only the rounding of
# each block's scale and minimum to bfloat16.
INT4_GROUP = blockwise.BLOCK


class WeightOnlyLinear(torch.nn.Module):
    """A linear layer whose weights are stored in few bits; activations pass as bfloat16.

    Decoding one token reads every weight once, so fewer weight bytes is most of the speed-up;
    PyTorch's own CPU kernels do the matmul (their float32 paths are slow reference code).
    """

    def __init__(self, bias: Any) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
        out = out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(WeightOnlyLinear):
    """int8 weights with one scale per output row (``_weight_int8pack_mm``)."""

    weight_int8: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: Any) -> None:
        super().__init__(bias)
        self.register_buffer("weight_int8", aligned(weight))
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = weight.shape

    @staticmethod
    def quantized(linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
        """The tensors that store ``linear`` in this format (the constructor's arguments)."""
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"weight": int8, "scale": scale.to(torch.bfloat16)}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(aligned(x), self.weight_int8, self.scale)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it at an address that is a multiple of 64 bytes.

    ``_weight_int8pack_mm`` on AVX-512 CPUs (PyTorch 2.13) reads its input and weights with
    aligned vector loads and crashes the process on a tensor that is not: activations that are
    views into a larger buffer, weights mapped from a safetensors file (8-byte aligned there).
    PyTorch's own allocations are 64-byte aligned, so the copy is made only where it is needed.
    """
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


class Int4Linear(WeightOnlyLinear):
    """4-bit weights in groups of INT4_GROUP input columns, each with a scale and a zero point.

    ``w = (code - 8) * scale + zero`` (the kernel's convention), ``zero = minimum + 8 * scale``.
    Stored in the kernel's own packed layout (``packed``), so the layer uses the tensors mapped
    from the cache file as they are; that layout is PyTorch's, so the cache key names the torch
    version. ``scale_zero`` is [groups, rows, 2].
    """

    packed: torch.Tensor
    scale_zero: torch.Tensor

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, bias: Any) -> None:
        super().__init__(bias)
        self.register_buffer("packed", packed)
        self.out_features = scale_zero.shape[1]
        self.in_features = scale_zero.shape[0] * INT4_GROUP
        self.register_buffer("scale_zero", scale_zero)

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        """The kernel wants whole groups of inputs and output rows in multiples of 16."""
        rows, columns = linear.weight.shape
        return columns % INT4_GROUP == 0 and rows % 16 == 0

    @staticmethod
    def quantized(linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
        weight = linear.weight.detach().float()
        codes, scale, low = blockwise.int4_groups(weight)
        codes = codes.to(torch.int32).reshape(weight.shape)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)
        return {"packed": packed, "scale_zero": scale_zero.contiguous().to(torch.bfloat16)}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, INT4_GROUP, self.scale_zero
        )


class BlockLinear(WeightOnlyLinear):
    """Weights in textgen's own kernels (blockwise.py) for x86-64 CPUs with AVX2: int4 as Q4
    (Q4_1) and int8 as Q8 (Q8_0) blocks of INT4_GROUP input columns, the activations rounded in
    the same blocks to two int8 digits; ``blocks`` holds them in the kernel's layout
    (blockwise.pack), whose last dimension names the format."""

    blocks: torch.Tensor

    def __init__(self, packed: torch.Tensor, rows: int, bias: Any) -> None:
        super().__init__(bias)
        self.register_buffer("blocks", packed)
        self.out_features, self.in_features = rows, packed.shape[1] * INT4_GROUP

    @property
    def bits(self) -> int:
        return blockwise.bits_of(self.blocks)

    @staticmethod
    def fits(linear: torch.nn.Linear, alone: bool = False) -> bool:
        """The kernels take input columns by blocks, and output rows by groups of 8: a layer
        joined with others into one matmul must have whole groups (``alone``: any rows)."""
        rows, columns = linear.weight.shape
        return columns % INT4_GROUP == 0 and (alone or rows % blockwise.GROUP == 0)

    @staticmethod
    def quantized(linear: torch.nn.Linear, bits: int) -> dict[str, torch.Tensor]:
        return {"blocks": blockwise.pack(linear.weight, bits)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = blockwise.matmul(x, self.blocks, self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer, the output layer included,
    in its stored format (an embedding lookup reads one row, so embeddings are left out)."""
    total, fused = 0, set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += sum(p.nbytes for p in module.parameters())
        elif isinstance(module, float16.Float16Linear):
            total += module.in_features * module.out_features * 2
        elif isinstance(module, float16.Float16Part) and id(module.fused) not in fused:
            fused.add(id(module.fused))
            total += module.fused.in_features * module.fused.out_features * 2
        elif isinstance(module, WeightOnlyLinear):
            total += sum(b.nbytes for b in module.buffers())
    return total


def layer_names(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(state-dict prefix, parent, attribute) of every linear layer."""
    names = {id(module): name for name, module in model.named_modules()}
    return [
        (f"{names[id(parent)]}.{attr}".lstrip("."), parent, attr)
        for parent, attr in linear_layers(model)
    ]


def quantized_tensors(model: torch.nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors that store every linear layer in ``dtype`` (int8 or int4).

    In int4, the output layer stays int8 (it is the most sensitive to rounding, and GGUF
    files keep it at 8 bits too: the embedded model's is Q8_0), and so does a layer the int4
    kernel cannot take (odd shapes). Where cpu.blocks_preferred(), textgen's kernels' layouts
    (BlockLinear: Q4 and Q8), else PyTorch's (Int4Linear, Int8Linear).
    """
    output = getattr(model, "get_output_embeddings", lambda: None)()
    blocks = cpu.blocks_preferred()
    tensors: dict[str, torch.Tensor] = {}
    for key, parent, attr in layer_names(model):
        linear = getattr(parent, attr)
        bits = 4 if dtype == "int4" and linear is not output else 8
        if blocks and BlockLinear.fits(linear, alone=linear is output):
            parts = BlockLinear.quantized(linear, bits)
        elif bits == 4 and not blocks and Int4Linear.fits(linear):
            parts = Int4Linear.quantized(linear)
        else:
            parts = Int8Linear.quantized(linear)
        tensors.update({f"{key}.{name}": tensor for name, tensor in parts.items()})
    return tensors


def swap_in(model: torch.nn.Module, stored: dict[str, torch.Tensor]) -> None:
    """Replace every linear layer by the quantized one ``stored`` holds for it."""
    for key, parent, attr in layer_names(model):
        bias = getattr(parent, attr).bias
        if f"{key}.blocks" in stored:
            rows = getattr(parent, attr).out_features
            layer: WeightOnlyLinear = BlockLinear(stored[f"{key}.blocks"], rows, bias)
        elif f"{key}.packed" in stored:
            layer = Int4Linear(stored[f"{key}.packed"], stored[f"{key}.scale_zero"], bias)
        else:
            layer = Int8Linear(stored[f"{key}.weight"], stored[f"{key}.scale"], bias)
        setattr(parent, attr, layer)


def apply_dtype(model: torch.nn.Module, dtype: str, model_dir: Path, cache: ModelCache) -> None:
    """Put the model's weights in ``dtype``; int8 and int4 weights are computed once and cached.

    Quantized layers use the tensors mapped from the cache file (shared by every worker); on the
    first start they are written, then mapped back from the file. PyTorch's own format, because
    it starts every tensor at a multiple of 64 bytes (safetensors packs them, and the int8
    kernel wants aligned weights: see ``aligned``).
    """
    if dtype == "float32":
        return
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
        return
    linearize(model)
    if dtype == "float16":
        if not float16.supported():
            raise ModelUnavailable(
                "float16 weights need PyTorch's fbgemm kernels, which this CPU's build lacks "
                "(x86-64 only); choose int4, int8 or float32 (#dtype in TEXTGEN_MODELS)"
            )
        float16.convert(model)
        return
    if cpu.blocks_preferred():
        try:
            blockwise.load(cache.root)
        except RuntimeError as exc:  # a compiler that cannot build them: slower, not down
            log.warning(
                "textgen's kernels could not be built, so %s weights take PyTorch's kernels "
                "(slower; see bench/RESULTS.md): %s",
                dtype, exc,
            )  # fmt: skip
            cpu.blocks_unbuildable()
    target = cache.quantized_path(model_dir, dtype)
    if not target.is_file():
        started = time.monotonic()
        log.info(
            "quantizing %s to %s into the cache: once, usually under a minute",
            model_dir.name,
            dtype,
        )
        tensors = quantized_tensors(model, dtype)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(f".{os.getpid()}.partial")
        torch.save({k: v.contiguous() for k, v in tensors.items()}, staging)
        os.replace(staging, target)
        log.info(
            "%s weights of %s prepared in %s (%.0f s)",
            dtype, model_dir.name, target, time.monotonic() - started,
        )  # fmt: skip
    try:
        tensors = torch.load(target, mmap=True, weights_only=True)
    except Exception as exc:
        raise damaged(target, exc) from exc
    swap_in(model, tensors)
