"""Involution (Li et al., CVPR 2021): a spatial-specific, channel-agnostic operator.

For every output pixel a small network generates a K x K kernel per channel group from the
pixel's own features, and the output is the kernel-weighted sum over the K x K neighbourhood:

    out[b, g*gc + c, i, j] = sum_{u, v} W[b, g, u*K + v, i, j] * xpad[b, g*gc + c, s*i + u, s*j + v]

The reference formulation (`involution_unfold_reference`, the mmcls/official "naive" version)
materialises ``F.unfold(x)``, a tensor K^2 times the activation (49x for K=7), and autograd saves it.
`involution2d` computes the same sum over K^2 shifted *views* of the padded input inside a custom
autograd function whose backward recomputes the views, so only ``x`` and the kernels are saved and
no K^2-sized tensor ever exists. On CPU the batch is processed in cache-sized chunks so the K^2
passes hit L2 instead of DRAM; on GPU it runs as one chunk (no host syncs, nothing device specific).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Involution",
    "involution2d",
    "involution_unfold_reference",
    "involution_output_size",
]

# Bytes of the per-chunk working set (input slice + kernels + output) targeted on CPU: about the L2
# size of one core, so the K^2 passes over a chunk are served from cache. Measured on a 2-core EPYC.
_CPU_CHUNK_BYTES = 1 << 20


def involution_output_size(size: int, stride: int) -> int:
    """Output side length: ceil(size / stride), the same as a K x K conv with 'same' padding."""
    return (size + stride - 1) // stride


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, groups: int) -> tuple[int, int]:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"involution expects 4-D x and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if kernel_size % 2 != 1:
        raise ValueError(f"involution kernel_size must be odd, got {kernel_size}")
    b, c, h, w = x.shape
    if c % groups != 0:
        raise ValueError(f"channels {c} not divisible by groups {groups}")
    ho, wo = involution_output_size(h, stride), involution_output_size(w, stride)
    expect = (b, groups * kernel_size * kernel_size, ho, wo)
    if tuple(weight.shape) != expect:
        raise ValueError(f"involution weight shape {tuple(weight.shape)} != expected {expect}")
    return ho, wo


def involution_unfold_reference(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1, groups: int = 1
) -> torch.Tensor:
    """Naive involution via ``F.unfold`` (the official implementation): the ground truth for tests.

    ``weight`` is (B, groups*K*K, ceil(H/s), ceil(W/s)); channel c uses kernel group c // (C/groups).
    Costs K^2 times the activation memory; use `involution2d` for anything but testing.
    """
    ho, wo = _check_shapes(x, weight, kernel_size, stride, groups)
    b, c, h, w = x.shape
    k2 = kernel_size * kernel_size
    pad = (kernel_size - 1) // 2
    cols = F.unfold(x, kernel_size, padding=pad, stride=stride)  # (B, C*K*K, L)
    cols = cols.view(b, groups, c // groups, k2, ho, wo)
    kern = weight.view(b, groups, 1, k2, ho, wo)
    return (cols * kern).sum(dim=3).reshape(b, c, ho, wo)


def _window(xpad: torch.Tensor, u: int, v: int, stride: int, ho: int, wo: int) -> torch.Tensor:
    """View of the padded input that kernel tap (u, v) reads for every output pixel."""
    return xpad[..., u : u + stride * (ho - 1) + 1 : stride, v : v + stride * (wo - 1) + 1 : stride]


def _chunks(batch: int, per_sample_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    """Batch ranges processed together: cache-sized on CPU, the whole batch elsewhere."""
    if device.type != "cpu":
        return [(0, batch)]
    n = max(1, min(batch, _CPU_CHUNK_BYTES // max(per_sample_bytes, 1)))
    # Even-sized chunks (the last one is not a tiny remainder) and at least 2 of them so both
    # intra-op threads have work even for small batches.
    parts = max(math.ceil(batch / n), min(batch, 2))
    step = math.ceil(batch / parts)
    return [(i, min(i + step, batch)) for i in range(0, batch, step)]


def _forward_chunk(x: torch.Tensor, weight: torch.Tensor, k: int, stride: int, groups: int, ho: int, wo: int) -> torch.Tensor:
    b, c, h, w = x.shape
    gc = c // groups
    pad = (k - 1) // 2
    xpad = F.pad(x, (pad, pad, pad, pad)).view(b, groups, gc, h + 2 * pad, w + 2 * pad)
    kern = weight.view(b, groups, k * k, 1, ho, wo)
    out = torch.empty(b, groups, gc, ho, wo, dtype=x.dtype, device=x.device)
    for t in range(k * k):
        u, v = divmod(t, k)
        win = _window(xpad, u, v, stride, ho, wo)
        if t == 0:
            torch.mul(win, kern[:, :, t], out=out)
        else:
            out.addcmul_(win, kern[:, :, t])
    return out.view(b, c, ho, wo)


def _backward_chunk(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, k: int, stride: int, groups: int,
    need_x: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    b, c, h, w = x.shape
    ho, wo = grad_out.shape[-2:]
    gc = c // groups
    pad = (k - 1) // 2
    hp, wp = h + 2 * pad, w + 2 * pad
    g = grad_out.reshape(b, groups, gc, ho, wo)
    kern = weight.view(b, groups, k * k, 1, ho, wo)
    gx = torch.zeros(b, groups, gc, hp, wp, dtype=x.dtype, device=x.device) if need_x else None
    # grad of the kernels, tap-major so each tap's slice is contiguous for the reduction's out=.
    gw = torch.empty(k * k, b, groups, ho, wo, dtype=x.dtype, device=x.device) if need_w else None
    xpad = F.pad(x, (pad, pad, pad, pad)).view(b, groups, gc, hp, wp) if need_w else None
    prod = torch.empty_like(g) if need_w else None
    for t in range(k * k):
        u, v = divmod(t, k)
        if gx is not None:
            _window(gx, u, v, stride, ho, wo).addcmul_(g, kern[:, :, t])
        if gw is not None:
            torch.mul(g, _window(xpad, u, v, stride, ho, wo), out=prod)
            torch.sum(prod, dim=2, out=gw[t])
    grad_x = gx.view(b, c, hp, wp)[..., pad : pad + h, pad : pad + w] if gx is not None else None
    grad_w = gw.permute(1, 2, 0, 3, 4).reshape(b, groups * k * k, ho, wo) if gw is not None else None
    return grad_x, grad_w


class _InvolutionFn(torch.autograd.Function):
    """Shifted-view involution; saves only (x, weight) and recomputes the views in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, groups: int) -> torch.Tensor:
        ho, wo = _check_shapes(x, weight, kernel_size, stride, groups)
        ctx.save_for_backward(x, weight)
        ctx.conf = (kernel_size, stride, groups)
        b, c, h, w = x.shape
        x = x.contiguous()
        weight = weight.contiguous()
        per_sample = x.element_size() * (c * (h + kernel_size) * (w + kernel_size) + weight[0].numel() + c * ho * wo)
        parts = [
            _forward_chunk(x[i:j], weight[i:j], kernel_size, stride, groups, ho, wo)
            for i, j in _chunks(b, per_sample, x.device)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        k, stride, groups = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x = x.contiguous()
        weight = weight.contiguous()
        grad_out = grad_out.contiguous()
        b, c, h, w = x.shape
        per_sample = x.element_size() * (3 * c * (h + k) * (w + k) + 2 * weight[0].numel())
        gxs, gws = [], []
        for i, j in _chunks(b, per_sample, x.device):
            gx, gw = _backward_chunk(grad_out[i:j], x[i:j], weight[i:j], k, stride, groups, need_x, need_w)
            gxs.append(gx)
            gws.append(gw)
        grad_x = (gxs[0] if len(gxs) == 1 else torch.cat(gxs, 0)) if need_x else None
        grad_w = (gws[0] if len(gws) == 1 else torch.cat(gws, 0)) if need_w else None
        return grad_x, grad_w, None, None, None


def involution2d(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """Memory-light involution: same result as `involution_unfold_reference`, without the unfold.

    Args:
        x: (B, C, H, W) input.
        weight: (B, groups*K*K, ceil(H/stride), ceil(W/stride)) per-pixel kernels, tap-major per group.
        kernel_size: odd K; the neighbourhood is zero-padded by (K-1)//2.
        stride: output stride (the kernels must already be at the output resolution).
        groups: number of kernel groups; channel c uses group c // (C // groups).
    """
    return _InvolutionFn.apply(x, weight, kernel_size, stride, groups)


class Involution(nn.Module):
    """Involution layer: kernel generation (reduce -> BN -> ReLU -> span) + `involution2d`.

    Matches the official RedNet layer: reduce = 1x1 conv C -> C/r (no bias) + BN + ReLU,
    span = 1x1 conv (with bias) -> K*K*G kernels, G = C / group_channels; for stride > 1 the kernels
    are generated from an average-pooled input (ceil mode, so odd sizes give ceil(H/s) like a conv).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if channels % group_channels != 0:
            raise ValueError(f"involution channels {channels} must be a multiple of group_channels {group_channels}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = channels // group_channels
        reduced = max(channels // reduction_ratio, 1)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=False)
        self.bn = norm_layer(reduced)
        self.act = act_layer()
        self.span = nn.Conv2d(reduced, kernel_size * kernel_size * self.groups, 1, bias=True)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel kernels (B, G*K*K, H/s, W/s) generated from the (pooled) input."""
        return self.span(self.act(self.bn(self.reduce(self.pool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution2d(x, self.kernels(x), self.kernel_size, self.stride, self.groups)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"
