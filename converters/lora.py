"""What a distillation trains: whole blocks, or LoRA adapters on them (Hu et al., 2021).

The embeddings stay frozen (pruning leaves them intact), and so do the
leading blocks ``distill.shared_prefix`` finds still equal to the teacher's.
The blocks above them train either whole, together with the norms outside
the blocks, or (``lora`` = rank) through an adapter on every linear layer in
them, attention and MLP projections alike, with the base weights frozen.
An adapter adds ``x A^T B^T`` to its layer's output; B starts at zero, so
training starts from the student exactly. The adapters are merged into their
base weights (W + B A) before saving, so the output is a plain checkpoint
that transformers loads and every converter takes like any other.
"""

from __future__ import annotations

import functools
import math


def trainable_parameters(model, frozen: int, lora: int) -> list:
    """Freeze the embeddings (pruning leaves them intact) and the first ``frozen`` blocks; train the rest,
    whole or (``lora`` > 0) through rank-``lora`` adapters. Returns the parameters to optimise."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = list(model.base_model.layers)[frozen:]
    if lora:
        return add_lora(layers, lora)
    params = [p for layer in layers for p in layer.parameters()]
    params += [p for name, p in model.base_model.named_parameters() if "norm" in name and not name.startswith("layers.")]
    for p in params:
        p.requires_grad_(True)
    return params


def add_lora(layers, rank: int) -> list:
    """Wrap every linear layer of ``layers`` in a rank-``rank`` adapter (Hu et al., 2021); returns the adapter parameters."""
    import torch

    trainable = []
    for layer in layers:
        for parent in list(layer.modules()):
            for attr, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    wrapped = _lora_linear()(child, rank)
                    setattr(parent, attr, wrapped)
                    trainable += [wrapped.a, wrapped.b]
    return trainable


def merge_lora(model) -> None:
    """Fold every adapter into its base weight (W + B A) and put the plain linear back."""
    import torch

    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, _lora_linear()):
                with torch.no_grad():
                    child.base.weight += (child.b @ child.a).to(child.base.weight.dtype)
                setattr(parent, attr, child.base)


@functools.cache
def _lora_linear():
    """The adapter module class, built on first use so importing this module does not import torch."""
    import torch

    class LoRALinear(torch.nn.Module):
        """``base(x) + x A^T B^T``: A starts random, B at zero, so training starts from the base model exactly."""

        def __init__(self, base: torch.nn.Linear, rank: int) -> None:
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

        def forward(self, x):
            return self.base(x) + (x @ self.a.t().to(x.dtype)) @ self.b.t().to(x.dtype)

    return LoRALinear
