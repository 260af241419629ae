"""Input normalisation inside the model.

Views arrive as float tensors in [0, 1]; every teacher and student was trained with its own
mean/std. Wrapping a model in `Normalized` makes it take raw views, so a caller can never feed a
model someone else's normalisation. Checkpoints store the bare model plus mean/std in the sidecar.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Normalized", "IMAGENET_MEAN", "IMAGENET_STD", "imagenet_normalization", "unwrap", "resize_views",
           "teacher_input"]

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


# PIL's filters as F.interpolate modes: PIL's NEAREST samples floor((i + 0.5) * scale), which is "nearest-exact"
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


def resize_views(views: torch.Tensor, size: int, interpolation: str | None = None) -> torch.Tensor:
    """(B, C, H, W) views -> float (B, C, size, size) in the same 0..255 units, on their device.

    Anti-aliased like PIL when shrinking; clamped to 0..255 because bicubic overshoots (PIL saturates too)."""
    mode = _MODES.get(interpolation or "bilinear")
    if mode is None:
        raise ValueError(f"interpolation must be one of {sorted(_MODES)}, got {interpolation!r}")
    smooth = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(views.float(), size=(size, size), mode=mode, **smooth)
    return out.clamp_(0.0, 255.0)


def teacher_input(views: torch.Tensor, mean, std, input_size: int | None = None,
                  interpolation: str | None = None) -> torch.Tensor:
    """uint8 views -> a teacher's input: resized on the device to ``input_size`` (when given and different from
    the views' size), then normalised with the teacher's own mean/std. Without a resize this is exactly
    ``shared.augment.to_model_input``."""
    from shared.augment import to_model_input
    if input_size is not None and tuple(views.shape[-2:]) != (input_size, input_size):
        views = resize_views(views, input_size, interpolation)
    return to_model_input(views, mean, std)
