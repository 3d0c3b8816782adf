"""Weight formats: float32, bfloat16, and int8 weight-only prepared once into the model cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from textgen.models.cache import ModelCache

log = logging.getLogger(__name__)


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights (one scale per output row) and bf16 activations.

    Decoding one token reads every weight once, so a quarter of fp32's bytes is most of the
    speed-up; PyTorch's own CPU kernel does the matmul.
    """

    weight_int8: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: Any) -> None:
        super().__init__()
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def quantized(cls, linear: torch.nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(int8, scale.to(torch.bfloat16), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        out = out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias


def linear_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every nn.Linear, the tied lm_head included."""
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear)
    ]


def to_int8(
    model: torch.nn.Module, stored: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Swap every linear layer for an Int8Linear, from ``stored`` tensors when given."""
    names = {id(module): name for name, module in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    for parent, attr in linear_layers(model):
        key = f"{names[id(parent)]}.{attr}".lstrip(".")
        linear = getattr(parent, attr)
        if stored is not None:
            layer = Int8Linear(stored[f"{key}.weight"], stored[f"{key}.scale"], linear.bias)
        else:
            layer = Int8Linear.quantized(linear)
        setattr(parent, attr, layer)
        tensors[f"{key}.weight"] = layer.weight_int8
        tensors[f"{key}.scale"] = layer.scale
    return tensors


def weights_key(model_dir: Path) -> str:
    """Identifies a model directory's weights by file names, sizes and times."""
    stamp = [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(model_dir.glob("*.safetensors"))
    ]
    raw = json.dumps([str(model_dir.resolve()), stamp]).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def apply_dtype(model: torch.nn.Module, dtype: str, model_dir: Path, cache: ModelCache) -> None:
    """Put the model's weights in ``dtype``; int8 weights are computed once and cached."""
    if dtype == "float32":
        return
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
        return
    target = (
        cache.root / "quantized" / f"{model_dir.name}-{weights_key(model_dir)}-int8.safetensors"
    )
    if target.is_file():
        to_int8(model, load_file(target))
        return
    tensors = to_int8(model, None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
    os.replace(staging, target)
    log.info("int8 weights of %s prepared in %s", model_dir, target)
