"""Finding the layers the weight formats replace."""

from __future__ import annotations

import torch


def linear_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every nn.Linear, the tied lm_head included."""
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear)
    ]


def linearize(model: torch.nn.Module) -> None:
    """Replace GPT-2's Conv1D layers (a linear layer with its weights stored transposed) by
    nn.Linear, so that the weight formats find them: the same products, stored as every other
    model stores them."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.nx, child.nf, device="meta")
                linear.weight = torch.nn.Parameter(child.weight.detach().t().contiguous(), False)
                linear.bias = torch.nn.Parameter(child.bias.detach(), False)
                setattr(parent, name, linear)
