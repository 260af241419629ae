"""RedNet (Li et al., CVPR 2021): a ResNet whose bottleneck 3x3 convs are 7x7 involutions.

ImageNet models follow the official mmcls `RedNet`: stem = conv3x3 s2 (C->32) + BN + ReLU,
involution 3x3 (32) + BN + ReLU, conv3x3 (32->64) + BN + ReLU, then 3x3/2 max-pool; bottleneck
stages with 1x1 convs for channel mixing, the 7x7 involution (stride by pooling) in the middle,
1x1 conv + BN downsample shortcuts, global average pool and a linear classifier. Parameter counts
at 224 px / 1000 classes are the published 9.23M / 12.39M / 15.54M / 25.65M (checked in tests).

`rednet_small` keeps the full resolution of 28-32 px inputs (stride-1 stem, no max-pool) and is
narrower, so it trains on a 2-core CPU. ``mixer="conv"`` builds the same network with a 3x3 conv in
place of each bottleneck involution: the "conv twin" used to measure what the involution costs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .involution import Involution

__all__ = ["RedNet", "RedBottleneck", "rednet26", "rednet38", "rednet50", "rednet101", "rednet_small", "REDNET_LAYERS"]

REDNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

MIXERS = ("involution", "conv")


def _conv_bn_act(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _mixer(kind: str, channels: int, kernel_size: int, stride: int, group_channels: int) -> nn.Module:
    if kind == "involution":
        return Involution(channels, kernel_size, stride, group_channels=group_channels)
    if kind == "conv":
        return nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
    raise ValueError(f"unknown RedNet mixer {kind!r}; expected one of {MIXERS}")


class RedBottleneck(nn.Module):
    """1x1 conv -> involution (or 3x3 conv twin) -> 1x1 conv, residual; stride sits on the middle op."""

    expansion = 4

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, kernel_size: int = 7, group_channels: int = 16,
        mixer: str = "involution",
    ) -> None:
        super().__init__()
        mid = out_chs // self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = _mixer(mixer, mid, kernel_size, stride, group_channels)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            # ceil-mode-consistent shortcut: a strided 1x1 conv also gives ceil(H/s) outputs
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act(x + shortcut)


class RedNet(nn.Module):
    """RedNet classifier (timm-style: `forward_features`, `forward_head`, `reset_classifier`)."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_width: int = 64,
        base_width: int = 64,
        small_input: bool = False,
        kernel_size: int = 7,
        group_channels: int = 16,
        mixer: str = "involution",
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"unknown RedNet mixer {mixer!r}; expected one of {MIXERS}")
        if stem_width % 2 or (stem_width // 2) % group_channels:
            raise ValueError(f"stem_width/2 must be a multiple of group_channels={group_channels}, got {stem_width}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        half = stem_width // 2
        # the conv twin replaces every involution, the stem's 3x3 one included
        stem_mixer = Involution(half, 3, 1, group_channels=group_channels) if mixer == "involution" \
            else nn.Conv2d(half, half, 3, 1, 1, bias=False)
        self.stem = nn.Sequential(
            _conv_bn_act(in_chans, half, 3, stride=1 if small_input else 2),
            stem_mixer,
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            _conv_bn_act(half, stem_width, 3),
        )
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        stages = []
        in_chs = stem_width
        for i, depth in enumerate(layers):
            out_chs = base_width * (2 ** i) * RedBottleneck.expansion
            blocks = [
                RedBottleneck(in_chs if b == 0 else out_chs, out_chs, stride=(1 if i == 0 else 2) if b == 0 else 1,
                              kernel_size=kernel_size, group_channels=group_channels, mixer=mixer)
                for b in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, RedBottleneck):
                    m.zero_init_last()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.maxpool(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _rednet(depth: int, img_size: int | None = None, **kwargs) -> RedNet:
    # img_size is accepted so every registry builder has one signature; RedNet is size-agnostic.
    return RedNet(REDNET_LAYERS[depth], **kwargs)


def rednet26(**kwargs) -> RedNet:
    """RedNet-26 (9.23M params at 1000 classes)."""
    return _rednet(26, **kwargs)


def rednet38(**kwargs) -> RedNet:
    """RedNet-38 (12.39M params)."""
    return _rednet(38, **kwargs)


def rednet50(**kwargs) -> RedNet:
    """RedNet-50 (15.54M params)."""
    return _rednet(50, **kwargs)


def rednet101(**kwargs) -> RedNet:
    """RedNet-101 (25.65M params)."""
    return _rednet(101, **kwargs)


def rednet_small(depth: int = 26, base_width: int = 16, stem_width: int = 32, img_size: int | None = None,
                 **kwargs) -> RedNet:
    """RedNet for 28-32 px inputs: stride-1 stem, no max-pool, base width 16 (a quarter of ImageNet's).

    Feature maps at 28 px: 28 -> 28 -> 14 -> 7 -> 4. ``depth`` picks the stage layout (26/38/50/101).
    """
    if depth not in REDNET_LAYERS:
        raise ValueError(f"rednet_small depth must be one of {sorted(REDNET_LAYERS)}, got {depth}")
    kwargs.setdefault("small_input", True)
    return RedNet(REDNET_LAYERS[depth], base_width=base_width, stem_width=stem_width, **kwargs)
