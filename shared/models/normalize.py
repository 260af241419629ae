"""Input normalisation inside the model.

Views arrive as float tensors in [0, 1]; every teacher and student was trained with its own
mean/std. Wrapping a model in `Normalized` makes it take raw views, so a caller can never feed a
model someone else's normalisation. Checkpoints store the bare model plus mean/std in the sidecar.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["Normalized", "IMAGENET_MEAN", "IMAGENET_STD", "imagenet_normalization", "unwrap"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalization(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for ``in_chans`` channels (grey images use the channel average)."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (mean,) * in_chans, (std,) * in_chans


class Normalized(nn.Module):
    """``model((x - mean) / std)`` with per-channel mean/std kept as (non-persistent) buffers."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"input has {x.shape[1]} channels, normalisation has {self.mean.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor):
        return self.model(self.normalize(x))

    def forward_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wrapped student's ``forward_heads`` on normalised input."""
        if not hasattr(self.model, "forward_heads"):
            raise AttributeError(f"{type(self.model).__name__} has no forward_heads")
        return self.model.forward_heads(self.normalize(x))

    def no_weight_decay(self) -> set[str]:
        inner = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in inner}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside any `Normalized` wrappers."""
    while isinstance(model, Normalized):
        model = model.model
    return model
