"""Mixup/CutMix with cached teachers: the trainer's mixed view is the one the cache builder fed the
teachers, bit for bit, whatever the worker or rank count; approx targets are the linear mix; exact cached KD and
online KD agree with mixing on."""
import json

import numpy as np
import pytest
import torch

from cache_builder.build import build_cache
from shared.augment import ViewSpec
from shared.cache_schema import LogitCache
from shared.manifest import Manifest
from shared.mixing import MixParams
from shared.views import render_mixed
from shared.reader import pieces_for_rows, read_piece
from tests.shard_fixtures import make_shards
from trainer import train as train_mod
from trainer.data import Batch, TrainViews, make_loader
from shared.targets import encode_logits
from trainer.losses import CiTLoss, KDTerm, LossConfig, MixInfo, mix_log_probs

SEED, VIEWS, N = 3, 2, 67          # 67 rows in shards of 20: the last shard's windows exercise the lone-row rule
SPEC = ViewSpec(image_size=28, mix="exact", mix_window=6, erase_prob=0.5)


@pytest.fixture(scope="module")
def exact(tmp_path_factory, tiny_teachers):
    root = tmp_path_factory.mktemp("mix")
    manifest = make_shards(str(root / "train"), num_samples=N, shard_size=20, prefix="mx")
    teachers = dict(tiny_teachers)
    build_cache(manifest.path, [(k, v) for k, v in teachers.items()], str(root / "cache.zarr"), views=VIEWS,
                topk=10, spec=SPEC, seed=SEED, chunk_rows=16, workers=0, progress=False, device="cpu")
    return {"root": root, "manifest": Manifest.load(manifest.path), "cache": str(root / "cache.zarr"),
            "teachers": teachers}


def builder_side_views(manifest, view):
    """The mixed views as stage 1 renders them: chunk by chunk over the manifest rows."""
    from cache_builder.streams import chunk_read_range
    out = {}
    for lo in range(0, N, 16):
        hi = min(lo + 16, N)
        a, z = chunk_read_range(manifest, SPEC, lo, hi)
        samples = [s for p in pieces_for_rows(manifest, a, z) for s in read_piece(manifest, p)]
        for row, (tensor, record, _, _) in render_mixed(SPEC, SEED, view, manifest, samples, range(lo, hi)).items():
            out[row] = (tensor, record)
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1)])
def test_trainer_mixed_views_equal_builder_views(exact, world, workers):
    manifest = exact["manifest"]
    cache = LogitCache.open(exact["cache"])
    for epoch in range(VIEWS):
        reference = builder_side_views(manifest, epoch)
        seen = {}
        for rank in range(world):
            ds = TrainViews(manifest, SPEC, SEED, VIEWS, seed=7, cache_url=exact["cache"], teachers=("conv",),
                            verify=True, rank=rank, world=world)
            ds.set_epoch(epoch)
            for batch in make_loader(ds, 8, workers, pin_memory=False):
                for j, row in enumerate(batch.rows.tolist()):
                    assert row not in seen
                    lam = float(batch.lam[j]) if batch.lam is not None else 1.0
                    seen[row] = (batch.views[j], lam)
        assert sorted(seen) == list(range(N))
        params = cache.read_params(epoch, 0, N)
        mixed = 0
        for row, (view, lam) in seen.items():
            assert torch.equal(view, reference[row][0]), row
            np.testing.assert_array_equal(params[row], reference[row][1])
            mix = MixParams.decode(params[row][-MixParams.SIZE:])
            mixed += mix.kind != 0
            assert lam == np.float32(mix.lam) and (mix.kind != 0 or lam == 1.0)
        assert mixed > N // 2


def test_cached_logits_are_the_teachers_on_the_mixed_view(exact):
    from shared.checkpoint import load_checkpoint
    from shared.augment import to_model_input
    model, meta = load_checkpoint(exact["teachers"]["inv"])
    cache = LogitCache.open(exact["cache"])
    ds = TrainViews(exact["manifest"], SPEC, SEED, VIEWS, cache_url=exact["cache"], teachers=("inv",), rank=0, world=1)
    ds.set_epoch(1)
    batch = Batch.cat(list(ds))
    with torch.inference_mode():
        logits = model.eval()(to_model_input(batch.views, meta.mean, meta.std)).float()
    log_p = torch.log_softmax(logits.double(), 1)
    stored = cache.read_topk("inv", 1, 0, N)
    order = batch.rows.numpy()
    np.testing.assert_allclose(stored.logp[order].astype(np.float32), log_p.topk(10, dim=1).values.numpy(),
                               rtol=2e-3, atol=2e-3)


def test_exact_cached_and_online_kd_agree_with_mixing(exact, tmp_path):
    def cfg(mode):
        sets = [f"data.train={json.dumps(exact['manifest'].path)}", f"data.cache={json.dumps(exact['cache'])}",
                f"data.view_seed={SEED}", "data.num_workers=0", "train.epochs=2", "train.batch_size=16",
                "train.progress=false", f"kd.mode={mode}", 'kd.conv_teacher="conv"', 'kd.inv_teacher="inv"',
                *(f"augment.{k}={json.dumps(v)}" for k, v in SPEC.to_dict().items()),
                "student.options.embed_dim=32", "student.options.depth=1", "student.options.num_heads=2",
                "student.options.stem_width=32"]
        return train_mod.load_run_config(None, sets)
    cached = train_mod.train(cfg("cached"), str(tmp_path / "cached"))
    online = train_mod.train(cfg("online"), str(tmp_path / "online"))
    for a, b in zip(cached.history, online.history):
        for key in ("train_loss", "train_ce", "train_kd_conv", "train_kd_inv"):
            assert a[key] == pytest.approx(b[key], rel=2e-3, abs=1e-4), key


def test_approx_targets_mix_the_tempered_distributions():
    """Temper first, then mix: q = λ·σ(z_a/τ) + (1−λ)·σ(z_b/τ) (a K = C record: the targets are the full tempered
    softmax), not σ(log(λ·σ(z_a) + (1−λ)·σ(z_b))/τ)."""
    torch.manual_seed(0)
    c, b, tau = 12, 6, 2.0
    full = torch.randn(b, c) * 3
    record = encode_logits(full, c, (1.0, tau))
    lam = torch.full((b,), 0.8)
    partner = torch.arange(b - 1, -1, -1)
    p = torch.softmax(full / tau, 1)
    torch.testing.assert_close(mix_log_probs(p.log(), lam, partner).exp(), 0.8 * p + 0.2 * p[partner])
    torch.testing.assert_close(mix_log_probs(p.log(), torch.ones(b), partner).exp(), p)
    # the loss uses exactly these mixed teacher distributions and mixed labels
    loss = CiTLoss(LossConfig(label_smoothing=0.0, tau1=tau), [KDTerm("conv", "conv", "t", 1.0, tau)], c,
                   temperatures=(1.0, tau))
    student = {"cls": torch.randn(b, c), "conv": torch.randn(b, c)}
    labels = torch.randint(0, c, (b,))
    total, parts = loss(student, labels, {"t": record}, MixInfo(labels[partner], lam, partner))
    q = 0.8 * p + 0.2 * p[partner]
    kl = (q * (q.log() - torch.log_softmax(student["conv"] / tau, 1))).sum() / b * tau * tau
    soft = 0.8 * torch.nn.functional.one_hot(labels, c) + 0.2 * torch.nn.functional.one_hot(labels[partner], c)
    ce = -(soft * torch.log_softmax(student["cls"], 1)).sum(1).mean()
    assert parts["kd_conv"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    # mixing before tempering gives another target: the own class's weight is no longer λ
    p1 = torch.softmax(full, 1)
    before = torch.softmax(torch.log(0.8 * p1 + 0.2 * p1[partner]) / tau, 1)
    wrong = (before * (before.log() - torch.log_softmax(student["conv"] / tau, 1))).sum() / b * tau * tau
    assert abs(wrong.item() - kl.item()) > 1e-3


def test_approx_mode_trains_from_an_unmixed_cache(exact, tmp_path):
    """An approx run uses a cache built without mixing (its views are the unmixed ones)."""
    root = exact["root"]
    plain = ViewSpec(image_size=28, erase_prob=0.5)
    build_cache(exact["manifest"].path, [("conv", exact["teachers"]["conv"])], str(root / "plain.zarr"),
                views=2, topk=10, spec=plain, seed=SEED, chunk_rows=16, workers=0, progress=False, device="cpu")
    sets = [f"data.train={json.dumps(exact['manifest'].path)}", f"data.cache={json.dumps(str(root / 'plain.zarr'))}",
            f"data.view_seed={SEED}", "data.num_workers=0", "train.epochs=1", "train.batch_size=16",
            "train.progress=false", 'kd.conv_teacher="conv"', "augment.erase_prob=0.5", 'augment.mix="approx"',
            "student.options.embed_dim=32", "student.options.depth=1", "student.options.num_heads=2",
            "student.options.stem_width=32"]
    cfg = train_mod.load_run_config(None, sets)
    p = train_mod.prepare(cfg)
    batch = next(iter(make_loader(p.train_set, 16, 0, pin_memory=False)))
    assert batch.partner_index is not None and batch.lam is not None
    result = train_mod.train(cfg, str(tmp_path / "approx"))
    assert np.isfinite(result.history[-1]["train_loss"])
