"""Mixup / CutMix as part of the view (``exact`` mode), and the pieces the trainer's ``approx`` mode shares.

``exact``: sample ``row``'s mixed view for view index v is ``mix(view(row, v), view(partner(row), v))``.  The
partner comes from a deterministic pairing inside a *window*: each shard's rows are cut into consecutive windows of
``mix_window`` rows (a last window of a single row joins the previous one); the rows of a window are permuted with
a generator keyed by (seed, view, window start) and each row's partner is the next row of that cycle.  λ, the
mixup/cutmix choice and the cut box come from a generator keyed by (seed, key, view).  Nothing depends on batch
position, worker count or process count, and a reader needs only the window around its rows — never random
access to the dataset.  Rule for a window of one row (a one-sample shard): the row is its own partner and is not
mixed (λ = 1).

The mixed view is still a uint8 tensor: mixup rounds λ·a + (1−λ)·b to the nearest integer (both stages run this
same function on the same bytes, so the teacher saw exactly what the student sees).  CutMix pastes the partner's
box; λ is then corrected to the uncut area, as timm does.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from shared import exact_math
from shared.augment import decode_record, encode_record, record_size
from shared.manifest import Manifest

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class MixParams:
    """One row's mixing decision: the ``mix`` part of the params record (``shared.view_spec.PARAMS_FIELDS``), which
    comes last, so it is the last ``SIZE`` floats of an exact-mode record."""
    kind: int = MIX_NONE
    partner: int = -1          # partner row (global), -1 when not mixed
    lam: float = 1.0           # weight of the row's own view (after the CutMix area correction)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)   # CutMix box: top, left, h, w (pixels)

    SIZE = record_size(None, ("mix",))

    def encode(self) -> np.ndarray:
        return encode_record(None, {"mix_kind": self.kind, "mix_partner": self.partner, "mix_lam": self.lam,
                                    "mix_box": self.box}, ("mix",))

    @classmethod
    def decode(cls, values) -> "MixParams":
        r = decode_record(None, values, ("mix",))
        return cls(int(r["mix_kind"][0]), int(r["mix_partner"][0]), r["mix_lam"][0],
                   tuple(int(x) for x in r["mix_box"]))


def window_bounds(manifest: Manifest, row: int, window: int) -> tuple[int, int]:
    """[lo, hi) of the pairing window holding ``row``: windows tile each shard from its first row."""
    shard = manifest.shards[manifest.shard_of_row(row)]
    offset = (row - shard.start) // window * window
    lo, hi = shard.start + offset, min(shard.start + offset + window, shard.stop)
    if hi - lo == 1 and lo > shard.start:          # a lone last row joins the previous window
        lo -= window
    elif shard.stop - hi == 1:                      # ... seen from the window it joins
        hi = shard.stop
    return lo, hi


def rows_with_partners(manifest: Manifest, lo: int, hi: int, window: int) -> tuple[int, int]:
    """The row range a reader must load to mix every row of [lo, hi): the union of their windows."""
    return window_bounds(manifest, lo, window)[0], window_bounds(manifest, hi - 1, window)[1]


def _generator(*parts) -> np.random.Generator:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def partner_of(manifest: Manifest, row: int, window: int, seed: int, view: int) -> int:
    lo, hi = window_bounds(manifest, row, window)
    cycle = _generator(seed, view, lo, "pairs").permutation(hi - lo) + lo
    position = int(np.nonzero(cycle == row)[0][0])
    return int(cycle[(position + 1) % len(cycle)])


def sample_mix(spec, seed: int, key: str, view: int, row: int, partner: int) -> MixParams:
    """λ, mixup-or-cutmix and the box for one row (``spec``: a ``shared.view_spec.ViewSpec``)."""
    rng = _generator(seed, key, view, "mix")
    u_apply, u_switch, u_cy, u_cx = rng.random(4)
    use_cutmix = spec.cutmix_alpha > 0 and (spec.mixup_alpha <= 0 or u_switch < spec.mix_switch_prob)
    alpha = spec.cutmix_alpha if use_cutmix else spec.mixup_alpha
    lam = exact_math.beta(rng, alpha, alpha) if alpha > 0 else 1.0
    if partner == row or u_apply >= spec.mix_prob or alpha <= 0:
        return MixParams()
    lam = float(np.float32(lam))
    if not use_cutmix:
        return MixParams(MIX_MIXUP, partner, lam)
    size = spec.image_size
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(size * cut), int(size * cut)
    cy, cx = int(u_cy * size), int(u_cx * size)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, size)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, size)
    box = (top, left, bottom - top, right - left)
    lam = float(np.float32(1.0 - box[2] * box[3] / (size * size)))
    return MixParams(MIX_CUTMIX, partner, lam, box)


def mix_views(own: torch.Tensor, partner: torch.Tensor, mix: MixParams) -> torch.Tensor:
    """The mixed uint8 view.  Pure: same inputs, same bytes, on every machine — mixup is two float64 products of
    a uint8 and a float32 (exact), one rounded sum and ``rint`` (IEEE, element by element: no vector path, thread
    count or device can change it)."""
    if not mix.kind:
        return own
    return torch.from_numpy(mix_arrays(own.numpy(), partner.numpy(), mix))


def mix_arrays(own: np.ndarray, partner: np.ndarray, mix: MixParams) -> np.ndarray:
    """``mix_views`` on uint8 numpy arrays (C, H, W); returns a new array (``own`` when not mixed)."""
    if mix.kind == MIX_MIXUP:
        lam = float(np.float32(mix.lam))
        mixed = np.rint(own.astype(np.float64) * lam + partner.astype(np.float64) * (1.0 - lam))
        return np.clip(mixed, 0, 255).astype(np.uint8)
    if mix.kind == MIX_CUTMIX:
        top, left, h, w = mix.box
        out = own.copy()
        out[:, top:top + h, left:left + w] = partner[:, top:top + h, left:left + w]
        return out
    return own


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor, num_classes: int,
                  smoothing: float = 0.0) -> torch.Tensor:
    """λ·onehot(y) + (1−λ)·onehot(y_partner), each smoothed like timm's mixup targets."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def onehot(y):
        return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y.view(-1, 1), on)

    lam = lam.view(-1, 1).to(torch.float32)
    return onehot(labels) * lam + onehot(partner_labels) * (1.0 - lam)


def batch_mix(views: torch.Tensor, rng: np.random.Generator, spec) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``approx`` mode: timm-style batch mixing (each sample with the batch reversed), one λ per batch.

    ``views`` are float (B, C, H, W) on any device; the draws are host-side from ``rng`` (the trainer seeds it from
    seed, epoch, step and rank, so a resumed run mixes the same way, and nothing waits on the device).  Returns the
    mixed views, λ and the partner index of each sample."""
    b = views.shape[0]
    partner = torch.arange(b - 1, -1, -1, device=views.device)
    u_apply, u_switch, u_cy, u_cx = rng.random(4)
    use_cutmix = spec.cutmix_alpha > 0 and (spec.mixup_alpha <= 0 or u_switch < spec.mix_switch_prob)
    alpha = spec.cutmix_alpha if use_cutmix else spec.mixup_alpha
    if alpha <= 0 or u_apply >= spec.mix_prob:
        return views, 1.0, partner
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return views * lam + views[partner] * (1.0 - lam), lam, partner
    size_h, size_w = views.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(size_h * cut), int(size_w * cut)
    cy, cx = int(u_cy * size_h), int(u_cx * size_w)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, size_h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, size_w)
    mixed = views.clone()
    mixed[:, :, top:bottom, left:right] = views[partner][:, :, top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (size_h * size_w), partner
