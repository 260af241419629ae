"""Pooled teacher features: how they are computed (the builder and the online trainer alike) and stored.

A teacher's pooled penultimate features are what its classifier reads: timm's (and RedNet's)
``forward_head(forward_features(x), pre_logits=True)`` — global average pooling for CNNs, the class token or the
pooled tokens for transformers.  ``logits_and_pooled`` computes both outputs from one ``forward_features`` pass;
for a timm-style model ``forward(x)`` is ``forward_head(forward_features(x))``, so the logits are the same bits as
``model(x)``.

Stored form (``shared.cache_schema``: ``<teacher>/features``, ``<teacher>/feature_scale``): per view, uint8 codes
q = round((f − lo) / step) with lo = min f, step = (max f − lo) / 255, and (lo, step) as float32; decoded
f̂ = lo + q·step, so |f̂ − f| <= step / 2 per element.  Chosen by measurement (``benchmarks/bench_cache.py --part
features``, Fashion-MNIST views, teachers trained 200 steps to ~0.95 train accuracy): 334 B per view for a RegNet's
368 features and 491 B for a RedNet's 512 (fp16: 583 / 807 B, bf16: 473 / 646 B), at a relative L2 error of 0.3%
mean, 0.5% worst per view (fp16: 0.02%, bf16: 0.2%) and <= 9e-4 on the batch's cosine-similarity matrix — noise far
below any mismatch a student's projection reaches.  Pooled post-ReLU features are non-negative with many zeros
(lo = 0 then); the per-view lo makes features of any sign work too.
"""
from __future__ import annotations

import numpy as np
import torch

FEATURE_KINDS = ("pooled",)      # what ``cit cache build --features`` can store
FEATURE_DTYPE = "uint8"          # the codes' dtype (TeacherRecord.feature_dtype)
LEVELS = 255


class FeatureError(ValueError):
    """The model exposes no pooled features (it is not a timm-style ``forward_features`` / ``forward_head``)."""


def feature_dim(model: torch.nn.Module) -> int:
    """The width of ``model``'s pooled features (``num_features``), after checking it can produce them."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise FeatureError(f"{type(model).__name__} has no forward_features / forward_head(pre_logits=True)")
    dim = getattr(model, "num_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise FeatureError(f"{type(model).__name__} does not say its feature width (num_features)")
    return dim


def logits_and_pooled(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C), pooled features (B, D)) of normalised input ``x``, from one ``forward_features`` pass."""
    fmap = model.forward_features(x)
    return model.forward_head(fmap), model.forward_head(fmap, pre_logits=True)


def encode_features(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (B, D) -> (uint8 codes (B, D), float32 (B, 2) [lo, step]); on the features' device, no host sync.
    A non-finite feature makes its row's (lo, step) non-finite (the writer refuses such rows)."""
    f = features.float()
    lo = f.amin(dim=1, keepdim=True)
    step = (f.amax(dim=1, keepdim=True) - lo) / LEVELS
    scaled = torch.where(step > 0, (f - lo) / torch.where(step > 0, step, 1.0), 0.0)
    codes = scaled.round().clamp(0, LEVELS).to(torch.uint8)
    return codes, torch.cat([lo, step], dim=1)


def decode_features(codes, scale):
    """float32 features lo + q·step from codes (..., D) and scale (..., 2): numpy arrays or torch tensors."""
    if isinstance(codes, torch.Tensor):
        return scale[..., 0:1].float() + codes.float() * scale[..., 1:2].float()
    scale = np.asarray(scale, np.float32)
    return scale[..., 0:1] + np.asarray(codes).astype(np.float32) * scale[..., 1:2]
