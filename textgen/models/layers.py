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
