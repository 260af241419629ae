"""Parameter and FLOP counts (per image, forward) for model tables and the `cit models` command.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convs, attention; 2 FLOPs
per multiply-add). It does not see the involution's multiply-adds, which run as elementwise ops,
so those are added here: 2 * C * H_out * W_out * K^2 per involution layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .involution import Involution, involution_output_size

__all__ = ["count_params", "count_flops"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> int:
    """Forward FLOPs of one batch of shape (batch_size, *input_size), model in eval mode."""
    extra = 0

    def hook(mod: Involution, args, _out) -> None:
        nonlocal extra
        b, c, h, w = args[0].shape
        ho, wo = involution_output_size(h, mod.stride), involution_output_size(w, mod.stride)
        extra += 2 * b * c * ho * wo * mod.kernel_size ** 2

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Involution)]
    was_training = model.training
    try:
        model.eval()
        device = next(iter(model.parameters()), torch.empty(0)).device
        x = torch.zeros(batch_size, *input_size, device=device)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops()) + extra
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
