"""CiT, the Co-advise student (Ren et al., CVPR 2022): a ViT with class, conv and involution tokens.

Token sequence: ``[cls, conv, inv, patch_1 .. patch_N]`` (conv/inv only when their head is enabled),
plus a positional embedding over all of them. Each prefix token has its own linear head: the class
head is fitted to labels, the conv head to a CNN teacher, the inv head to an involution teacher.

Token modes:
- ``random``: conv/inv tokens are learned parameters (like DeiT's distillation token) and patches
  come from the usual linear patch projection (conv k=p, s=p).
- ``align`` (CiT-SAK, the official code): a convolution stem and an involution (RedNet) stem, each
  ending in a projection to the patch grid, replace the linear projection. Patch tokens are the SUM
  of the two projected stems; the conv token is the MEAN over positions of the conv stem's projected
  output and the inv token that of the inv stem's. They are not learned parameters. Both stems exist
  whatever heads are enabled (they are the patch embedding).

Outputs: ``forward_heads(x)`` always returns ``{head: logits}`` for the enabled heads; ``forward(x)``
returns that dict in training mode and, in eval mode, one tensor: the class head (``eval_head="cls"``,
the paper's text) or the mean of the enabled heads (``"mean"``, the official evaluation).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from .involution import Involution

__all__ = ["CiT", "CitOutput", "ConvStem", "InvStem", "HEADS", "TOKEN_MODES", "EVAL_HEADS", "combine_heads",
           "cit_nano", "cit_tiny", "cit_small"]

HEADS = ("cls", "conv", "inv")
TOKEN_MODES = ("random", "align")
EVAL_HEADS = ("cls", "mean")
_HEAD_ATTR = {"cls": "head", "conv": "head_conv", "inv": "head_inv"}

CitOutput = dict[str, torch.Tensor]
"""Training output: ``{head: logits}`` for the enabled heads (a plain dict: trainers, DDP and
torch.compile handle it, and a one-token model simply has one key)."""


def combine_heads(out: dict[str, torch.Tensor], how: str = "mean") -> torch.Tensor:
    """One prediction from ``{head: logits}``: one head by name, or ``"mean"`` of all of them."""
    if how == "mean":
        return torch.stack(list(out.values())).mean(0)
    if how not in out:
        raise KeyError(f"head {how!r} not among the model's heads {tuple(out)}")
    return out[how]


def _stem_stride(patch_size: int) -> int:
    """The stems downsample 2x first (as the official 16 = 2 x 8) when the patch allows it."""
    return 2 if patch_size % 2 == 0 and patch_size >= 4 else 1


def _cbr(in_chs: int, out_chs: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, k, stride, k // 2, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]


class ConvStem(nn.Module):
    """Official CiT conv stem: 7x7/2 conv + two 3x3 convs (BN-ReLU), ``proj`` to the patch grid."""

    def __init__(self, in_chans: int, width: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        s = _stem_stride(patch_size)
        self.body = nn.Sequential(*_cbr(in_chans, width, 7 if s > 1 else 3, s), *_cbr(width, width, 3),
                                  *_cbr(width, width, 3))
        self.proj = nn.Conv2d(width, embed_dim, patch_size // s, patch_size // s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


class InvStem(nn.Module):
    """RedNet stem (conv3x3 + involution 3x3 + conv3x3, BN-ReLU), ``proj`` to the patch grid."""

    def __init__(self, in_chans: int, width: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        s = _stem_stride(patch_size)
        half = width // 2
        self.body = nn.Sequential(*_cbr(in_chans, half, 3, s), Involution(half, 3, 1), nn.BatchNorm2d(half),
                                  nn.ReLU(inplace=True), *_cbr(half, width, 3))
        self.proj = nn.Conv2d(width, embed_dim, patch_size // s, patch_size // s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


class CiT(nn.Module):
    """Vision transformer with per-bias prefix tokens and heads (see module docstring)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_mode: str = "align",
        heads: Sequence[str] = HEADS,
        eval_head: str = "mean",
        stem_width: int = 64,
    ) -> None:
        super().__init__()
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {token_mode!r}")
        unknown = [h for h in heads if h not in HEADS]
        if unknown or "cls" not in heads or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct names from {HEADS} including 'cls', got {tuple(heads)}")
        if eval_head not in EVAL_HEADS:
            raise ValueError(f"eval_head must be one of {EVAL_HEADS}, got {eval_head!r}")
        if patch_size is None:
            patch_size = 16 if img_size >= 128 else 4
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if token_mode == "align" and stem_width % 32:
            raise ValueError(f"align mode needs stem_width a multiple of 32 (involution groups), got {stem_width}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.token_mode, self.eval_head = token_mode, eval_head
        self.heads = tuple(h for h in HEADS if h in heads)  # canonical order = token order
        self.num_prefix_tokens = len(self.heads)
        self.grid = img_size // patch_size
        num_patches = self.grid * self.grid

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if token_mode == "random":
            self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
            self.conv_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if "conv" in self.heads else None
            self.inv_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if "inv" in self.heads else None
        else:
            self.conv_stem = ConvStem(in_chans, stem_width, embed_dim, patch_size)
            self.inv_stem = InvStem(in_chans, stem_width, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for h in self.heads:
            setattr(self, _HEAD_ATTR[h], nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity())
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, getattr(self, "conv_token", None), getattr(self, "inv_token", None)):
            if p is not None:
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.token_mode == "align":
            for m in [*self.conv_stem.modules(), *self.inv_stem.modules()]:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token", "conv_token", "inv_token"}
        return {n for n, _ in self.named_parameters() if n in names}

    def head_modules(self) -> dict[str, nn.Module]:
        """``{head name: its classifier}`` for the enabled heads, in token order."""
        return {h: getattr(self, _HEAD_ATTR[h]) for h in self.heads}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix + patch tokens (B, P + N, D), before the positional embedding."""
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.token_mode == "random":
            patches = self.patch_embed(x).flatten(2).transpose(1, 2)
            prefix += [t.expand(b, -1, -1) for t in (self.conv_token, self.inv_token) if t is not None]
        else:
            conv = self.conv_stem(x).flatten(2).transpose(1, 2)
            inv = self.inv_stem(x).flatten(2).transpose(1, 2)
            patches = conv + inv
            if "conv" in self.heads:
                prefix.append(conv.mean(1, keepdim=True))
            if "inv" in self.heads:
                prefix.append(inv.mean(1, keepdim=True))
        return torch.cat(prefix + [patches], 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.embed(x) + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward_pooled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{head: (B, D)}``: the token each head reads (class, conv, inv token), after the final norm."""
        tokens = self.forward_features(x)[:, :len(self.heads)]   # one slice of the big tensor: its backward is
        return {h: tokens[:, i] for i, h in enumerate(self.heads)}  # one scatter, not one per distilled head

    def forward_heads(self, x: torch.Tensor) -> CitOutput:
        """Logits of every enabled head, whatever the mode."""
        pooled = self.forward_pooled(x)
        return {h: head(pooled[h]) for h, head in self.head_modules().items()}

    def predict(self, x: torch.Tensor, head: str | None = None) -> torch.Tensor:
        """One prediction: ``head`` ("cls", "conv", "inv" or "mean"), default ``self.eval_head``."""
        return combine_heads(self.forward_heads(x), head or self.eval_head)

    def forward(self, x: torch.Tensor) -> CitOutput | torch.Tensor:
        out = self.forward_heads(x)
        return out if self.training else combine_heads(out, self.eval_head)


def _cit(img_size: int = 224, **kwargs) -> CiT:
    return CiT(img_size=img_size, **kwargs)


def cit_nano(**kwargs) -> CiT:
    """96 dim, 4 blocks, 3 heads, stems 32 wide: a student a 2-core CPU trains in minutes at 28 px."""
    kwargs.setdefault("stem_width", 32)
    return _cit(**{"embed_dim": 96, "depth": 4, "num_heads": 3, **kwargs})


def cit_tiny(**kwargs) -> CiT:
    """DeiT-Ti sized: 192 dim, 12 blocks, 3 heads."""
    return _cit(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def cit_small(**kwargs) -> CiT:
    """DeiT-S sized: 384 dim, 12 blocks, 6 heads."""
    return _cit(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})
