"""Exact-mode mixing: deterministic pairing inside windows, pure mixing of uint8 views, mixed targets."""
import numpy as np
import pytest
import torch

from shared.augment import ViewSpec
from shared.manifest import Manifest, ShardInfo
from shared.mixing import (MIX_CUTMIX, MIX_MIXUP, MixParams, batch_mix, mix_views, mixed_targets, partner_of,
                           rows_with_partners, sample_mix, window_bounds)


def manifest_of(sizes):
    return Manifest([ShardInfo(f"s{i}.tar", n, "0" * 64) for i, n in enumerate(sizes)], 10, [str(c) for c in range(10)])


@pytest.mark.parametrize("sizes,window", [([10, 7, 1, 9], 4), ([64, 65, 3], 8), ([5], 2), ([2, 2], 3)])
def test_windows_tile_each_shard(sizes, window):
    manifest = manifest_of(sizes)
    for shard in manifest.shards:
        seen = []
        row = shard.start
        while row < shard.stop:
            lo, hi = window_bounds(manifest, row, window)
            assert lo == row and shard.start <= lo < hi <= shard.stop
            assert all(window_bounds(manifest, r, window) == (lo, hi) for r in range(lo, hi))
            assert hi - lo >= 2 or shard.samples == 1          # a lone row joins its neighbour
            seen += range(lo, hi)
            row = hi
        assert seen == list(range(shard.start, shard.stop))


def test_partners_stay_in_window_and_form_cycles():
    manifest = manifest_of([10, 7, 1, 9])
    for view in range(3):
        for row in range(manifest.num_samples):
            partner = partner_of(manifest, row, 4, seed=5, view=view)
            lo, hi = window_bounds(manifest, row, 4)
            assert lo <= partner < hi
            assert (partner == row) == (hi - lo == 1)          # only a one-sample shard is its own partner
    partners = [partner_of(manifest, r, 4, 5, 0) for r in range(manifest.num_samples)]
    assert sorted(partners) == list(range(manifest.num_samples))   # a permutation: every row is someone's partner
    assert partners != [partner_of(manifest, r, 4, 5, 1) for r in range(manifest.num_samples)]


def test_rows_with_partners_covers_windows():
    manifest = manifest_of([64, 65])
    lo, hi = rows_with_partners(manifest, 70, 100, 8)
    assert (lo, hi) == (64, 104)
    assert rows_with_partners(manifest, 120, 129, 8) == (120, 129)   # the lone last row joined the window


def test_sample_mix_rules():
    spec = ViewSpec(mix="exact", image_size=28)
    kinds = {sample_mix(spec, 0, f"k{i}", 0, i, i + 1).kind for i in range(200)}
    assert kinds == {MIX_MIXUP, MIX_CUTMIX}
    assert sample_mix(spec, 0, "k", 0, 3, 3) == MixParams()             # own partner: not mixed
    assert sample_mix(ViewSpec(mix="exact", mix_prob=0.0), 0, "k", 0, 3, 4) == MixParams()
    for i in range(100):
        mix = sample_mix(spec, 0, f"k{i}", 2, i, i + 1)
        assert mix == sample_mix(spec, 0, f"k{i}", 2, i, i + 1)
        assert MixParams.decode(np.asarray(mix.encode(), np.float32)) == mix
        if mix.kind == MIX_CUTMIX:
            top, left, h, w = mix.box
            assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 28
            assert mix.lam == pytest.approx(1 - h * w / 784, abs=1e-6)


def test_mix_views_is_exact():
    a = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    b = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    mixed = mix_views(a, b, MixParams(MIX_MIXUP, 1, 0.25))
    assert torch.equal(mixed, (a.float() * 0.25 + b.float() * 0.75).round().to(torch.uint8))
    cut = mix_views(a, b, MixParams(MIX_CUTMIX, 1, 0.5, (2, 3, 10, 12)))
    assert torch.equal(cut[:, 2:12, 3:15], b[:, 2:12, 3:15])
    cut[:, 2:12, 3:15] = a[:, 2:12, 3:15]
    assert torch.equal(cut, a)
    assert mix_views(a, b, MixParams()) is a


def test_mixed_targets():
    y, yp = torch.tensor([1, 2]), torch.tensor([3, 2])
    t = mixed_targets(y, yp, torch.tensor([0.7, 0.4]), 5, smoothing=0.0)
    assert torch.allclose(t[0], torch.tensor([0, 0.7, 0, 0.3, 0]))
    assert torch.allclose(t[1], torch.tensor([0, 0, 1.0, 0, 0]))
    assert torch.allclose(mixed_targets(y, yp, torch.tensor([0.7, 0.4]), 5, 0.1).sum(1), torch.ones(2))


def test_batch_mix_reproducible():
    spec = ViewSpec(mix="approx")
    views = torch.rand(6, 1, 28, 28)
    m1, lam1, p1 = batch_mix(views, np.random.default_rng(3), spec)
    m2, lam2, p2 = batch_mix(views, np.random.default_rng(3), spec)
    assert torch.equal(m1, m2) and lam1 == lam2 and torch.equal(p1, torch.arange(5, -1, -1))
    assert 0 <= lam1 <= 1


def test_view_identity_ignores_mix_settings_unless_exact():
    assert ViewSpec(mix="approx", mixup_alpha=0.2).view_identity() == ViewSpec().view_identity()
    assert ViewSpec(mix="exact").view_identity() != ViewSpec().view_identity()
    assert ViewSpec(mix="exact").num_params == ViewSpec().num_params + MixParams.SIZE
    with pytest.raises(ValueError, match="augment.mix"):
        ViewSpec(mix="sometimes")
