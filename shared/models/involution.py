"""Involution (Li et al., CVPR 2021): a spatial-specific, channel-agnostic operator.

For every output pixel a small network generates a K x K kernel per channel group from the
pixel's own features, and the output is the kernel-weighted sum over the K x K neighbourhood:

    out[b, g*gc + c, i, j] = sum_{u, v} W[b, g, u*K + v, i, j] * xpad[b, g*gc + c, s*i + u, s*j + v]

The reference formulation (`involution_unfold_reference`, the mmcls/official "naive" version)
materialises ``F.unfold(x)``, a tensor K^2 times the activation (49x for K=7), and autograd saves it.
`involution2d` computes the same sum over K^2 shifted *views* of the padded input inside a custom
autograd function whose backward recomputes the views, so only ``x`` and the kernels (padded to
the wide rows) are saved and no K^2-sized tensor ever exists (see `_Geometry` for the layout that makes every tap one
unit-stride multiply-add). On CPU the batch is processed in cache-sized chunks so the K^2
passes hit cache instead of DRAM; on GPU it runs as one chunk (no host syncs, nothing device specific).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Involution",
    "involution2d",
    "involution_unfold_reference",
    "involution_output_size",
    "StridePool",
]

# Bytes of the per-chunk working set (input components + output) on CPU: the K^2 passes over a chunk
# then stay in cache (L2 + L3) while the number of small ops stays low. 2-8 MB measured alike on a
# 2-core EPYC (32 MB L3); larger chunks spill, smaller ones pay per-op overhead.
_CPU_CHUNK_BYTES = 8 << 20


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


@dataclass(frozen=True)
class _Geometry:
    """Index plan for the "wide row" layout.

    The zero-padded input is split into stride x stride polyphase components (one component when
    stride is 1), each a (Hq, Wq) grid flattened row-major. Output pixel (i, j) of tap (u, v) then
    reads component (u % s, v % s) at flat index (i + u // s) * Wq + (j + v // s), so for a fixed tap
    the whole output, computed on a (Ho, Wq) grid whose columns j >= Wo are discarded, is ONE
    contiguous slice of length Ho * Wq. Every tap is a single vectorised multiply-add with unit
    stride (a strided 2-D window would run inner loops of only Wo elements).
    """

    k: int
    s: int
    h: int
    w: int
    pad: int
    ho: int
    wo: int
    hq: int
    wq: int

    @classmethod
    def of(cls, h: int, w: int, k: int, s: int) -> "_Geometry":
        pad = (k - 1) // 2
        ho, wo = involution_output_size(h, s), involution_output_size(w, s)
        reach = (k - 1) // s  # largest tap offset inside a polyphase component
        wq = max(wo + reach, -(-(pad + w) // s))
        hq = max(ho + reach, -(-(pad + h) // s)) + 1  # +1 row: the last wide row may run past Wo
        return cls(k, s, h, w, pad, ho, wo, hq, wq)

    @property
    def length(self) -> int:
        return self.ho * self.wq

    def taps(self):
        """(tap index, polyphase component, flat offset) for every kernel tap."""
        for t in range(self.k * self.k):
            u, v = divmod(t, self.k)
            yield t, (u % self.s) * self.s + (v % self.s), (u // self.s) * self.wq + (v // self.s)

    def split(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """(B, C, H, W) -> zero-padded polyphase components (B, G, C/G, s*s, Hq*Wq)."""
        b, c = x.shape[:2]
        s = self.s
        buf = x.new_zeros(b, c, s * self.hq, s * self.wq)
        buf[..., self.pad : self.pad + self.h, self.pad : self.pad + self.w] = x
        if s > 1:
            buf = buf.view(b, c, self.hq, s, self.wq, s).permute(0, 1, 3, 5, 2, 4)
        return buf.reshape(b, groups, c // groups, s * s, self.hq * self.wq)

    def merge(self, comps: torch.Tensor) -> torch.Tensor:
        """Inverse of `split` for gradients: components -> (B, C, H, W) (a view when stride is 1)."""
        b = comps.shape[0]
        s = self.s
        buf = comps.reshape(b, -1, s, s, self.hq, self.wq)
        buf = buf.permute(0, 1, 4, 2, 5, 3).reshape(b, -1, s * self.hq, s * self.wq)
        return buf[..., self.pad : self.pad + self.h, self.pad : self.pad + self.w]

    def widen(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n, Ho, Wo) -> (B, n, Ho*Wq), zero in the discarded columns."""
        return F.pad(t, (0, self.wq - self.wo)).reshape(t.shape[0], t.shape[1], self.length)

    def narrow(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n, Ho*Wq) -> (B, n, Ho, Wo) view dropping the discarded columns."""
        return t.view(t.shape[0], -1, self.ho, self.wq)[..., : self.wo]


def _chunks(batch: int, per_sample_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    """Batch ranges processed together: cache-sized on CPU, the whole batch elsewhere."""
    if device.type != "cpu":
        return [(0, batch)]
    n = max(1, min(batch, _CPU_CHUNK_BYTES // max(per_sample_bytes, 1)))
    parts = math.ceil(batch / n)
    step = math.ceil(batch / parts)  # even-sized chunks, no tiny remainder
    return [(i, min(i + step, batch)) for i in range(0, batch, step)]


def _tap_views(comps: torch.Tensor, geo: _Geometry) -> list[torch.Tensor]:
    """For each tap, the (B, G, gc, Ho*Wq) slice of the components it reads (views, no copies)."""
    phases = comps.unbind(3)
    return [phases[ph].narrow(-1, off, geo.length) for _, ph, off in geo.taps()]


def _forward(x: torch.Tensor, kern: torch.Tensor, geo: _Geometry, groups: int) -> torch.Tensor:
    """``kern``: widened kernels (B, G, K*K, 1, L). Returns the wide output (B, G, gc, L)."""
    b, c = x.shape[:2]
    comps = geo.split(x, groups)
    out = torch.empty(b, groups, c // groups, geo.length, dtype=x.dtype, device=x.device)
    per_sample = x.element_size() * c * (comps[0].numel() // c + geo.length)
    for i, j in _chunks(b, per_sample, x.device):
        o, taps, ks = out[i:j], _tap_views(comps[i:j], geo), kern[i:j].unbind(2)
        torch.mul(taps[0], ks[0], out=o)
        for win, k in zip(taps[1:], ks[1:]):
            o.addcmul_(win, k)
    return out


def _backward(
    grad_out: torch.Tensor, x: torch.Tensor, kern: torch.Tensor, geo: _Geometry, groups: int,
    need_x: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    b, c = x.shape[:2]
    gc = c // groups
    g = geo.widen(grad_out).view(b, groups, gc, geo.length)  # zero in discarded columns: no gradient from them
    grad_comps = x.new_zeros(b, groups, gc, geo.s * geo.s, geo.hq * geo.wq) if need_x else None
    comps = geo.split(x, groups) if need_w else None
    grad_kern = torch.empty(b, groups, geo.k * geo.k, geo.length, dtype=x.dtype, device=x.device) if need_w else None
    per_sample = x.element_size() * c * (2 * geo.s * geo.s * geo.hq * geo.wq + 2 * geo.length)
    for i, j in _chunks(b, per_sample, x.device):
        gi = g[i:j]
        if need_x:
            ks = kern[i:j].unbind(2)
            for win, k in zip(_tap_views(grad_comps[i:j], geo), ks):
                win.addcmul_(gi, k)
        if need_w:
            prod = torch.empty_like(gi)
            for win, gk in zip(_tap_views(comps[i:j], geo), grad_kern[i:j].unbind(2)):
                torch.mul(gi, win, out=prod)
                torch.sum(prod, dim=2, out=gk)
    grad_x = geo.merge(grad_comps) if need_x else None
    grad_w = geo.narrow(grad_kern.view(b, -1, geo.length)) if need_w else None
    return grad_x, grad_w


class _InvolutionFn(torch.autograd.Function):
    """Shifted-slice involution; saves only x and the kernels, recomputes the slices in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, groups: int) -> torch.Tensor:
        _check_shapes(x, weight, kernel_size, stride, groups)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        geo = _Geometry.of(x.shape[2], x.shape[3], kernel_size, stride)
        xc = _compute(x)
        # kernels on the wide grid, kept for backward instead of the originals (same size + Wq/Wo)
        kern = geo.widen(_compute(weight)).view(x.shape[0], groups, kernel_size * kernel_size, 1, geo.length)
        ctx.save_for_backward(x, kern)
        ctx.conf = (geo, groups, weight.dtype)
        out = _forward(xc, kern, geo, groups)
        return geo.narrow(out.view(x.shape[0], x.shape[1], geo.length)).to(out_dtype, memory_format=torch.contiguous_format)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, kern = ctx.saved_tensors
        geo, groups, w_dtype = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_w = _backward(_compute(grad_out), _compute(x), kern, geo, groups, need_x, need_w)
        grad_x = grad_x.to(x.dtype) if need_x else None
        grad_w = grad_w.to(w_dtype) if need_w else None
        return grad_x, grad_w, None, None, None


def _compute(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, and float32 for half types: K^2-term sums in bf16/fp16 lose too much precision."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.contiguous()


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


def _sum(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
    for p in parts[2:]:
        out += p
    return out


class StridePool(nn.Module):
    """Average pooling with kernel = stride, ceil mode (a partial last window averages what it covers).

    Equals ``nn.AvgPool2d(s, s, ceil_mode=True)``, computed as s-1 + s-1 unit-stride adds of row and
    column slices: ~5x faster forward and ~2x forward+backward than ``F.avg_pool2d`` on CPU (NCHW).
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        b, c, h, w = x.shape
        ho, wo = involution_output_size(h, s), involution_output_size(w, s)
        exact = ho * s == h and wo * s == w
        if not exact:
            x = F.pad(x, (0, wo * s - w, 0, ho * s - h))
        x = _sum(x.reshape(b, c, ho, s, wo * s).unbind(3))
        x = _sum(x.view(b, c, ho, wo, s).unbind(4))
        if exact:
            return x * (1.0 / (s * s))
        rows = torch.full((ho, 1), float(s), device=x.device, dtype=x.dtype)
        rows[-1] = h - (ho - 1) * s
        cols = torch.full((wo,), float(s), device=x.device, dtype=x.dtype)
        cols[-1] = w - (wo - 1) * s
        return x / (rows * cols)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


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
        self.pool = StridePool(stride) if stride > 1 else nn.Identity()
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
