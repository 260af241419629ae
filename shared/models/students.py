"""Students without distillation tokens: any timm model with one linear head per distillation term.

The paper's Table 4 trains ResNet-10 and Mixer-Ti students beside the transformer; a CNN or an MLP-Mixer has no
class / conv / inv tokens, so each term of Eq. 1 gets its own linear classifier on the model's *pooled* features
(``forward_features`` then ``forward_head(pre_logits=True)``: global average pooling for CNNs and Mixers, the class
token for a ViT).  The heads differ only in their last linear layer — the paper leaves open how its non-transformer
students carry three outputs; this is the cheapest choice that keeps Eq. 1 unchanged.

Outputs match ``CiT``: ``forward_heads(x)`` is ``{head: logits}``; ``forward`` returns it in training mode and one
tensor in eval mode (``eval_head``: the class head, or the mean of the heads).

Small inputs (28-32 px): ResNets get the stride-1 stem without max-pool (``shared.models.conv.adapt_small_input``);
Mixers and ViTs take 4 px patches (7 x 7 = 49 tokens at 28 px), 16 px patches from 128 px up.
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .cit import EVAL_HEADS, HEADS, combine_heads
from .conv import adapt_small_input

__all__ = ["TimmStudent", "timm_student", "resnet10_student", "mixer_ti_student", "vit_ti_student",
           "default_patch_size", "STUDENT_BUILDERS"]


def default_patch_size(img_size: int) -> int:
    """16 px patches from 128 px up (the paper's 224 px setting), 4 px below (7 x 7 tokens at 28 px)."""
    return 16 if img_size >= 128 else 4


class TimmStudent(nn.Module):
    """A timm backbone (built with ``num_classes=0``) plus one ``nn.Linear`` per head on its pooled features."""

    def __init__(self, backbone: nn.Module, num_classes: int, heads: Sequence[str] = ("cls",),
                 eval_head: str = "mean") -> None:
        super().__init__()
        unknown = [h for h in heads if h not in HEADS]
        if unknown or "cls" not in heads or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct names from {HEADS} including 'cls', got {tuple(heads)}")
        if eval_head not in EVAL_HEADS:
            raise ValueError(f"eval_head must be one of {EVAL_HEADS}, got {eval_head!r}")
        self.backbone = backbone
        self.heads = tuple(h for h in HEADS if h in heads)
        self.eval_head = eval_head
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.classifiers = nn.ModuleDict({h: nn.Linear(self.num_features, num_classes) for h in self.heads})
        for linear in self.classifiers.values():
            trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in inner}

    def head_modules(self) -> dict[str, nn.Module]:
        return dict(self.classifiers.items())

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features): what every head reads."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_pooled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{head: (B, num_features)}``: every head reads the same pooled features."""
        f = self.pooled(x)
        return {h: f for h in self.heads}

    def forward_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.pooled(x)
        return {h: head(f) for h, head in self.classifiers.items()}

    def predict(self, x: torch.Tensor, head: str | None = None) -> torch.Tensor:
        return combine_heads(self.forward_heads(x), head or self.eval_head)

    def forward(self, x: torch.Tensor):
        out = self.forward_heads(x)
        return out if self.training else combine_heads(out, self.eval_head)


def timm_student(model: str, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 heads: Sequence[str] = ("cls",), eval_head: str = "mean", small_input: bool | None = None,
                 **kwargs) -> TimmStudent:
    """Any timm model ``model`` as a student (never downloads weights).  ``small_input`` (default: on up to 64 px)
    gives timm CNNs the stride-1 stem; transformers and Mixers get ``img_size`` (and their own ``patch_size``)."""
    if not timm.is_model(model):
        raise ValueError(f"{model!r} is not a timm model name (see timm.list_models())")
    if _takes_img_size(model):
        kwargs.setdefault("img_size", img_size)
    backbone = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if small_input if small_input is not None else (img_size <= 64 and not _takes_img_size(model)):
        adapt_small_input(backbone, model)
    return TimmStudent(backbone, num_classes, heads, eval_head)


# timm families whose models are built for one input size (patch grid, position embeddings): they get img_size
SIZED_FAMILIES = ("vision_transformer", "deit", "mlp_mixer", "cait", "xcit", "swin_transformer", "beit", "eva")


def _takes_img_size(model: str) -> bool:
    return timm.models.model_entrypoint(model).__module__.rsplit(".", 1)[-1] in SIZED_FAMILIES


def resnet10_student(**kwargs) -> TimmStudent:
    """The paper's ResNet-10: timm ``resnet10t`` (one block per stage, tiered deep stem; 4.9 M parameters at
    1000 classes).  ``channels`` / ``stem_width`` shrink it."""
    return timm_student("resnet10t", **kwargs)


def _sized_student(backbone_cls: type, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                   heads: Sequence[str] = ("cls",), eval_head: str = "mean", patch_size: int | None = None,
                   **kwargs) -> TimmStudent:
    backbone = backbone_cls(num_classes=0, in_chans=in_chans, img_size=img_size,
                            patch_size=patch_size or default_patch_size(img_size), **kwargs)
    return TimmStudent(backbone, num_classes, heads, eval_head)


def mixer_ti_student(**kwargs) -> TimmStudent:
    """Mixer-Ti: timm ``MlpMixer`` with 12 blocks of width 192 (token / channel MLP ratios 0.5 / 4, timm's)."""
    from timm.models.mlp_mixer import MlpMixer
    return _sized_student(MlpMixer, **{"num_blocks": 12, "embed_dim": 192, **kwargs})


def vit_ti_student(**kwargs) -> TimmStudent:
    """A DeiT-Ti-like ViT: timm ``VisionTransformer`` with 192 dim, 12 blocks, 3 heads, class-token pooling."""
    from timm.models.vision_transformer import VisionTransformer
    return _sized_student(VisionTransformer, **{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


STUDENT_BUILDERS = {"resnet10_student": resnet10_student, "mixer_ti_student": mixer_ti_student,
                    "vit_ti_student": vit_ti_student}
