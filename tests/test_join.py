"""The batched cache join: every batch's cached fields equal per-row reads of the store with plain ``zarr``, and
the targets built from them equal the per-row teacher distributions (computed here in numpy), with mixing off,
exact and approx; pieces and shards are crossed inside batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from shared.augment import ViewSpec
from shared.manifest import Manifest
from tests.shard_fixtures import make_shards
from tests.train_fixtures import build_cache
from trainer.data import TrainViews, make_loader
from trainer.losses import CiTLoss, KDTerm, LossConfig, MixInfo

SEED, VIEWS, N, C, K = 4, 2, 45, 10, 4          # shards of 20 rows: batches of 16 cross pieces and shards
TEMPS = (1.0, 2.0)
TEACHERS = ("a", "b")
SPECS = {"off": ViewSpec(image_size=28, erase_prob=0.5),
         "exact": ViewSpec(image_size=28, mix="exact", mix_window=6),
         "approx": ViewSpec(image_size=28, erase_prob=0.5, mix="approx", mixup_alpha=0.8, cutmix_alpha=1.0,
                            mix_prob=1.0)}


def _teacher(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, C)).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("join")
    manifest = make_shards(str(root / "train"), num_samples=N, shard_size=20, prefix="jn")
    teachers = {name: {"model": _teacher(i), "mean": (0.5,), "std": (0.25,)} for i, name in enumerate(TEACHERS)}
    caches = {}
    for mode in ("off", "exact"):          # approx trains from the unmixed cache
        caches[mode] = str(root / f"{mode}.zarr")
        build_cache(caches[mode], manifest, SPECS[mode], SEED, VIEWS, teachers, topk=K, temperatures=TEMPS)
    caches["approx"] = caches["off"]
    return Manifest.load(manifest.path), caches


def reference_q(group: zarr.Group, teacher: str, view: int, row: int, tau_slot: int) -> np.ndarray:
    """The teacher's distribution at the cached τ of ``tau_slot`` for one row, from a plain per-row read: the
    top-k keep their tempered relative weights times 1 − m, the tail mass m is spread over the other classes."""
    logp = group[f"{teacher}/logp"][view, row].astype(np.float64)
    indices = group[f"{teacher}/indices"][view, row].astype(np.int64)
    m = float(np.exp(group[f"{teacher}/tail"][view, row, tau_slot].astype(np.float64)))
    scaled = logp / TEMPS[tau_slot]
    top = np.exp(scaled - scaled.max())
    q = np.full(C, m / (C - K))
    q[indices] = (1 - m) * top / top.sum()
    return q


@pytest.mark.parametrize("mode", ["off", "exact", "approx"])
def test_batched_join_equals_per_row_reads(world, mode):
    manifest, caches = world
    group = zarr.open_group(caches[mode], mode="r")
    ds = TrainViews(manifest, SPECS[mode], SEED, VIEWS, seed=1, cache_url=caches[mode], teachers=TEACHERS,
                    rank=0, world=1)
    ds.set_epoch(1)
    view = 1
    loss = CiTLoss(LossConfig(tau1=2.0, tau2=1.0), [KDTerm("conv", "conv", "a", 1.0, 2.0),
                                                   KDTerm("inv", "inv", "b", 1.0, 1.0)], C, temperatures=TEMPS)
    seen, crossed, mixed = [], 0, 0
    for batch in make_loader(ds, 16, 0, pin_memory=False):
        rows = batch.rows.tolist()
        seen += rows
        crossed += len({r // 20 for r in rows}) > 1
        for t, name in enumerate(TEACHERS):
            for j, row in enumerate(rows):
                np.testing.assert_array_equal(batch.topk_logp[t, j].numpy(), group[f"{name}/logp"][view, row])
                np.testing.assert_array_equal(batch.topk_indices[t, j].numpy(), group[f"{name}/indices"][view, row])
                np.testing.assert_array_equal(batch.topk_tail[t, j].numpy(), group[f"{name}/tail"][view, row])
        mix = None
        if mode == "approx":
            assert batch.partner_index is not None
            mix = MixInfo(batch.partner_labels, batch.lam, batch.partner_index)
        elif mode == "exact":
            mixed += int(batch.lam is not None and bool((batch.lam < 1).any()))
        targets = loss.targets(batch.targets(list(TEACHERS)), mix).exp().double().numpy()   # (terms, B, C)
        for t, (name, slot) in enumerate((("a", 1), ("b", 0))):
            ref = np.stack([reference_q(group, name, view, row, slot) for row in rows])
            if mix is not None:        # approx: the two views' tempered distributions, mixed linearly
                lam = batch.lam.double().numpy()[:, None]
                ref = lam * ref + (1 - lam) * ref[batch.partner_index.numpy()]
            np.testing.assert_allclose(targets[t], ref, rtol=1e-5, atol=1e-7)
    assert sorted(seen) == list(range(N)) and crossed > 0
    assert mode != "exact" or mixed > 0


def _formula_kl(students: torch.Tensor, log_q: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(q ‖ σ(s/τ)) of one term, batchmean, written out.  Zero-mass (-inf) teacher classes add 0."""
    q = log_q.exp()
    kl = torch.special.xlogy(q, q) - q * torch.log_softmax(students / tau, dim=-1)
    return kl.sum() / students.shape[0] * tau ** 2


def _per_teacher_loss(loss: CiTLoss, outputs, labels, targets, mix):
    """Eq. 1 term by term, each teacher's target and KL on its own (the unfused reference: torch's own KL and
    autograd's gradient, not the fused node's closed form)."""
    from trainer.losses import mix_log_probs
    total, _ = CiTLoss(loss.cfg, [], loss.num_classes, loss.temperatures)(outputs, labels, targets, mix)
    parts = {}
    for term in loss.terms:
        log_q = loss.model.log_probs(targets[term.teacher], term.tau)
        if mix is not None and mix.partner_index is not None:
            log_q = mix_log_probs(log_q, mix.lam, mix.partner_index)
        parts[term.slot] = _formula_kl(outputs[term.head], log_q, term.tau)
        total = total + term.weight * parts[term.slot]
    return total, parts


@pytest.mark.parametrize("case", ["two taus", "topk cut", "renormalize", "uncached tau", "online", "approx mix",
                                  "one token, same teacher"])
def test_fused_loss_equals_the_per_teacher_loss(case):
    from shared.targets import encode_logits
    torch.manual_seed(0)
    b, c, k = 6, 12, 5
    full = {"a": torch.randn(b, c) * 3, "b": torch.randn(b, c) * 2}
    cached = {n: tuple(x.half() if x.is_floating_point() else x for x in encode_logits(z, k, TEMPS))
              for n, z in full.items()}
    cfg = {"topk cut": LossConfig(topk=3), "renormalize": LossConfig(tail="renormalize", tau1=3.0)}.get(case,
                                                                                                   LossConfig())
    t1, t2 = (2.0, 1.0) if case != "uncached tau" else (1.5, 2.0)
    terms = [KDTerm("conv", "conv", "a", 0.7, t1), KDTerm("inv", "inv", "b", 1.3, t2)]
    if case == "one token, same teacher":
        terms = [KDTerm("conv", "cls", "a", 0.7, 2.0), KDTerm("inv", "cls", "a", 1.3, 2.0)]
    outputs = {h: torch.randn(b, c, requires_grad=True) for h in ("cls", "conv", "inv")}
    labels = torch.randint(0, c, (b,))
    targets = full if case == "online" else cached
    mix = None
    if case == "approx mix":
        partner = torch.arange(b - 1, -1, -1)
        mix = MixInfo(labels[partner], torch.full((b,), 0.7), partner)
    with pytest.warns(UserWarning) if case == "uncached tau" else _no_warning():
        loss = CiTLoss(cfg, terms, c, temperatures=None if case == "online" else TEMPS, cache_topk=k)
    fused, parts = loss(outputs, labels, targets, mix)
    reference, ref_parts = _per_teacher_loss(loss, outputs, labels, targets, mix)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    for slot, value in ref_parts.items():
        torch.testing.assert_close(parts[f"kd_{slot}"], value.detach(), rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(fused, list(outputs.values()), allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(reference, list(outputs.values()), allow_unused=True, materialize_grads=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
