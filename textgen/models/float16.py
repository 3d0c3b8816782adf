"""float16 weights through fbgemm's fp16 GEMM, packed at load; projections that read the same
input (q/k/v, gate/up) are packed together as one matmul."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from textgen.models.layers import linear_layers

# Sibling projections that transformers' causal LMs apply to one and the same input.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


def supported() -> bool:
    """fbgemm, which has the float16 kernel, is built into PyTorch for x86-64 only."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)


def matmul(x: torch.Tensor, packed: Any, out_features: int) -> torch.Tensor:
    out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), packed)
    return out.reshape(*x.shape[:-1], out_features)


class Float16Linear(torch.nn.Module):
    """float16 weights in fbgemm's packed layout, float32 activations and accumulation.

    fbgemm's fp16 GEMM (``quantized::linear_dynamic_fp16``) converts the weights to float32 in
    registers, so the model stays float32 everywhere else: no activation casts, and results
    within about 1e-5 of float32 on the float16-rounded weights. It is the fastest format here
    once several rows share a step (the int8/int4 kernels are compute-poor there). The packed
    weights are private memory of each process: unlike int8/int4 they are not mapped from the
    cache, so N workers hold N copies.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = pack(linear.weight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.packed, self.out_features)


class Float16Fused:
    """Several linear layers over one input, packed as one matmul (one call instead of three
    for q/k/v: 44 against 92 us at one row here; each output equals its own layer's bit for
    bit, since every output column is its own dot product).

    The written-out decode step calls it directly (``matmul``). transformers' forward calls the
    layers one by one with the same input tensor: each part is a ``Float16Part``, and the first
    part called computes all of them for that input, the others take their columns.
    """

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        self.sizes = [linear.out_features for linear in linears]
        weight = torch.cat([linear.weight.detach().float() for linear in linears])
        bias = None
        if any(linear.bias is not None for linear in linears):
            bias = torch.cat(
                [
                    linear.bias.detach().float()
                    if linear.bias is not None
                    else torch.zeros(linear.out_features)
                    for linear in linears
                ]
            )
        self.packed = pack(weight, bias)
        self.in_features, self.out_features = linears[0].in_features, sum(self.sizes)
        self._input: torch.Tensor | None = None
        self._output: list[torch.Tensor] = []
        self._left = 0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs for ``x`` side by side."""
        return matmul(x, self.packed, self.out_features)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output for ``x`` (views into one result)."""
        return list(self.matmul(x).split(self.sizes, dim=-1))

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Layer ``index``'s output, computed with the others' the first time ``x`` comes.

        The result is kept (with ``x`` itself, so its identity cannot be reused) until every
        part has taken its columns.
        """
        if x is not self._input:
            self._input, self._output = x, self.split(x)
            self._left = len(self.sizes)
        out = self._output[index]
        self._left -= 1
        if self._left <= 0:
            self._input, self._output = None, []
        return out


class Float16Part(torch.nn.Module):
    """One layer of a Float16Fused group, as transformers' forward calls it."""

    def __init__(self, fused: Float16Fused, index: int) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)


def fused_group(module: torch.nn.Module, names: tuple[str, ...]) -> Float16Fused | None:
    """The Float16Fused that holds ``module``'s layers ``names`` in that order, if any."""
    parts = [getattr(module, name, None) for name in names]
    if not all(isinstance(part, Float16Part) for part in parts):
        return None
    fused = parts[0].fused  # type: ignore[union-attr]
    in_order = [(part.fused, part.index) for part in parts] == [  # type: ignore[union-attr]
        (fused, index) for index in range(len(names))
    ]
    return fused if in_order and len(fused.sizes) == len(names) else None


def convert(model: torch.nn.Module) -> None:
    """Pack every linear layer of ``model`` in float16, fusing the FUSED_GROUPS it has.

    Packing converts each weight element by element (about 1.4 s for the embedded model on
    one core), so layers are packed on as many threads as torch computes with (0.8 s on two).
    """
    groups: list[tuple[torch.nn.Module, tuple[str, ...], list[torch.nn.Linear]]] = []
    for parent in model.modules():
        for names in FUSED_GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if all(isinstance(linear, torch.nn.Linear) for linear in linears) and (
                len({linear.in_features for linear in linears}) == 1  # type: ignore[union-attr]
            ):
                groups.append((parent, names, linears))  # type: ignore[arg-type]
    grouped = {id(linear) for _, _, linears in groups for linear in linears}
    singles = [
        (parent, name, getattr(parent, name))
        for parent, name in linear_layers(model)
        if id(getattr(parent, name)) not in grouped
    ]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        fused = list(pool.map(Float16Fused, [linears for _, _, linears in groups]))
        packed = list(pool.map(Float16Linear, [child for _, _, child in singles]))
    for (parent, names, _), group in zip(groups, fused, strict=True):
        for index, name in enumerate(names):
            setattr(parent, name, Float16Part(group, index))
    for (parent, name, _), layer in zip(singles, packed, strict=True):
        setattr(parent, name, layer)
    # The rest (embeddings, norms) becomes private too, which unmaps the float32 file: packing
    # read all of it, and its pages would otherwise stay in the worker's RSS.
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
