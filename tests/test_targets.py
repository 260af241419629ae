"""The exact teacher target (cache format 2): top-k probabilities and tail mass at every cached temperature,
checked against a real teacher's full logits and a direct float64 computation written here (not the code's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_builder import BuildError, build_cache
from cache_builder.cli import cache as cache_cli
from shared.augment import ViewSpec, to_model_input
from shared.cache_schema import CacheError, LogitCache, TopK
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.manifest import Manifest
from shared.reader import pieces_for_rows, read_piece
from shared.targets import encode_logits
from shared.views import render_view
from tests.cache_fixtures import make_teacher
from tests.shard_fixtures import make_shards
from trainer.losses import CiTLoss, KDTerm, LossConfig, TargetModel

C, K, N, TEMPS = 10, 3, 40, (1.0, 2.0, 4.0)
SPEC = ViewSpec.from_dict({"image_size": 16, "mean": [0.4], "std": [0.3]})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real build (K < C, τ = 1, 2, 4) and the teacher's full logits on the same views, in float64."""
    root = tmp_path_factory.mktemp("targets")
    data = make_shards(str(root / "train"), num_samples=N, shard_size=20, prefix="tg", seed=3)
    teacher = make_teacher(str(root / "t.safetensors"), "conv", num_classes=C, seed=4)
    model, _ = load_checkpoint(teacher)
    with torch.no_grad():                              # logits of a real spread (an untrained head gives ~0.05)
        model.fc.weight.mul_(60.0)
        model.fc.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    save_checkpoint(model.eval(), teacher, {"kind": "conv", "mean": [0.4], "std": [0.3]})
    url = str(root / "c.zarr")
    build_cache(data.path, [f"t={teacher}"], url, views=1, topk=K, spec=SPEC, seed=2, temperatures=TEMPS,
                batch_size=16, workers=0, threads=1, progress=False)
    manifest = Manifest.load(data.path)
    raws = [s for p in pieces_for_rows(manifest, 0, N) for s in read_piece(manifest, p)]
    views = torch.stack([render_view(SPEC, 2, 0, raw)[0] for raw in raws])
    model, meta = load_checkpoint(teacher)
    with torch.inference_mode():
        logits = model.eval()(to_model_input(views, meta.mean, meta.std)).double().numpy()
    return {"url": url, "logits": logits, "cache": LogitCache.open(url), "data": data.path, "teacher": teacher}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _direct_target(full: np.ndarray, k: int, tau: float, tail: str = "uniform") -> np.ndarray:
    """The documented target straight from the full logits: the true top-k probabilities at τ, the true tail mass
    at τ spread evenly over the other classes (or, renormalised, no tail)."""
    p = _softmax(full / tau)
    top = np.argsort(-full, axis=1, kind="stable")[:, :k]
    q = np.empty_like(p)
    for i in range(len(p)):
        p_top = p[i, top[i]]
        q[i, :] = 0.0 if tail == "renormalize" else (1.0 - p_top.sum()) / (p.shape[1] - k)
        q[i, top[i]] = p_top / p_top.sum() if tail == "renormalize" else p_top
    return q


def _direct_kd(student: np.ndarray, q: np.ndarray, tau: float) -> float:
    log_s = np.log(_softmax(student / tau))
    safe = np.where(q > 0, q, 1.0)
    return float((q * (np.log(safe) - log_s)).sum(1).mean() * tau * tau)


def test_stored_top_k_and_tail_are_exact_at_every_cached_temperature(built):
    full, top = built["logits"], built["cache"].read_topk("t", 0, 0, N)
    assert built["cache"].attrs.temperatures == list(TEMPS) and top.tail.shape == (N, len(TEMPS))
    order = np.argsort(-full, axis=1, kind="stable")[:, :K]
    gaps = (-np.diff(np.sort(full, 1)[:, ::-1], axis=1))[:, :K].min(1)
    clear = gaps > 1e-4                                # no near-tie: the top-k set is unambiguous
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(top.indices[clear], order[clear])
    for s, tau in enumerate(TEMPS):
        p = _softmax(full / tau)
        true_tail = 1.0 - np.take_along_axis(p, order, 1).sum(1)
        assert (true_tail > 0).all() and true_tail.max() > 0.1
        np.testing.assert_allclose(np.exp(top.tail[:, s].astype(np.float64)), true_tail, rtol=0, atol=3e-4)
        # the rebuilt distribution at τ against the direct one: every class
        cfg = LossConfig()
        q = TargetModel(cfg, C, TEMPS).log_probs(
            tuple(torch.from_numpy(np.asarray(a)) for a in (top.logp, top.indices, top.tail)), tau).exp().numpy()
        np.testing.assert_allclose(q[clear], _direct_target(full, K, tau)[clear], rtol=0, atol=5e-4)


@pytest.mark.parametrize("topk,tail", [(0, "uniform"), (2, "uniform"), (0, "renormalize")])
def test_kd_loss_equals_a_direct_computation_from_the_full_logits(built, topk, tail):
    full, top = built["logits"], built["cache"].read_topk("t", 0, 0, N)
    rng = np.random.default_rng(0)
    student = {h: rng.normal(size=(N, C)) * 2 for h in ("cls", "conv", "inv")}
    labels = torch.from_numpy(rng.integers(0, C, N))
    gaps = (-np.diff(np.sort(full, 1)[:, ::-1], axis=1))[:, :K].min(1)
    keep = gaps > 1e-4                                  # rows whose top-k order is unambiguous
    cached = {"t": tuple(torch.from_numpy(np.asarray(a)[keep]) for a in (top.logp, top.indices, top.tail))}
    outputs = {h: torch.from_numpy(v[keep]).float() for h, v in student.items()}
    for tau in TEMPS:
        cfg = LossConfig(tau1=tau, tau2=tau, topk=topk, tail=tail)
        terms = [KDTerm("conv", "conv", "t", 1.0, tau)]
        _, parts = CiTLoss(cfg, terms, C, temperatures=TEMPS)(outputs, labels[keep], cached)
        expected = _direct_kd(student["conv"][keep], _direct_target(full[keep], topk or K, tau, tail), tau)
        assert parts["kd_conv"].item() == pytest.approx(expected, abs=1e-3, rel=1e-3), tau
        # online: the same target model from the live logits (cut to the cache's K)
        online = CiTLoss(cfg, terms, C, cache_topk=K)(outputs, labels[keep],
                                                       {"t": torch.from_numpy(full[keep]).float()})[1]
        assert online["kd_conv"].item() == pytest.approx(expected, abs=1e-4, rel=1e-4), tau


def test_confident_teachers_at_1000_classes_keep_their_tail():
    """C = 1000, K = 10, top-1 probability ~0.994: 1 − Σ exp(fp16 logit − lse) is <= 0 in many rows; the stored
    tail log-mass is finite in every row and right to 1e-3 absolute (and 1% relative) at τ = 1, 2 and 4."""
    rng = np.random.default_rng(0)
    rows, c, k = 2000, 1000, 10
    z = rng.normal(20.0, 1.0, (rows, c))              # logits around 20, as real heads have (fp16 step 1/64)
    z[np.arange(rows), rng.integers(0, c, rows)] += 13.0
    z_t = torch.from_numpy(z).float()
    naive = 1 - np.exp(z_t.topk(k, 1).values.half().double().numpy()
                       - torch.logsumexp(z_t, 1, keepdim=True).double().numpy()).sum(1)
    assert (naive <= 0).mean() > 0.2                   # the format-1 failure this layout removes
    stored = TopK.from_float(*encode_logits(z_t, k, TEMPS), c)
    assert np.isfinite(stored.tail.astype(np.float32)).all()
    order = np.argsort(-z, axis=1)[:, :k]
    for s, tau in enumerate(TEMPS):
        true_tail = 1.0 - np.take_along_axis(_softmax(z / tau), order, 1).sum(1)
        got = np.exp(stored.tail[:, s].astype(np.float64))
        assert np.abs(got - true_tail).max() < 1e-3
        np.testing.assert_allclose(got, true_tail, rtol=1e-2)
        if tau == 1.0:
            assert np.median(true_tail) < 0.01          # confident indeed


def test_format_1_is_refused_naming_both_versions_and_the_rebuild(built, tmp_path):
    import shutil
    import zarr
    old = str(tmp_path / "old.zarr")
    shutil.copytree(built["url"], old)
    zarr.open_group(old, mode="r+").attrs["format"] = 1
    with pytest.raises(CacheError, match=r"format 1, this cit reads format 2.*cit cache build .*--force"):
        LogitCache.open(old)
    result = CliRunner().invoke(cache_cli, ["info", old])
    assert result.exit_code == 2 and "format 1" in result.output and "Traceback" not in result.output
    # the builder refuses to overwrite it without --force, and rebuilds it with --force
    options = dict(views=1, topk=K, spec=SPEC, seed=2, temperatures=TEMPS, batch_size=16, workers=0, threads=1,
                   progress=False)
    with pytest.raises(BuildError, match=r"older format \(this cit writes format 2\); pass --force"):
        build_cache(built["data"], [f"t={built['teacher']}"], old, **options)
    assert build_cache(built["data"], [f"t={built['teacher']}"], old, force=True, **options).complete
    assert LogitCache.open(old).attrs.format == 2


def test_the_writer_refuses_an_unsorted_block(built, tmp_path):
    import shutil
    url = str(tmp_path / "w.zarr")
    shutil.copytree(built["url"], url)
    cache = LogitCache.open(url, "r+")
    good = cache.read_topk("t", 0, 0, 20)
    params = cache.read_params(0, 0, 20)
    digests = cache.read_digests(0, 0, 20)
    bad = TopK(good.logp[:, ::-1].copy(), good.indices[:, ::-1].copy(), good.tail)
    cache.root["done"][0, 0] = 0
    with pytest.raises(CacheError, match=r"teacher t, view 0, chunk 0: top-k log-probabilities are not sorted"):
        cache.write_unit(0, 0, params, {"t": bad}, digests=digests)
    assert cache.done_map()[0, 0] == 0
    np.testing.assert_array_equal(cache.read_topk("t", 0, 0, 20).logp, good.logp)


def test_a_temperature_that_was_not_cached_warns_and_is_approximate(built):
    full, top = built["logits"], built["cache"].read_topk("t", 0, 0, N)
    cached = tuple(torch.from_numpy(np.asarray(a)) for a in (top.logp, top.indices, top.tail))
    with pytest.warns(UserWarning, match=r"loss.tau1=3 is not a temperature the cache holds \(1, 2, 4\).*"
                                         r"approximate.*--temperatures"):
        loss = CiTLoss(LossConfig(tau1=3.0), [KDTerm("conv", "conv", "t", 1.0, 3.0)], C, temperatures=TEMPS)
    q = loss.model.log_probs(cached, 3.0).exp().numpy()
    direct = _direct_target(full, K, 3.0)
    order = np.argsort(-full, axis=1, kind="stable")[:, :K]
    # top-k relative weights exact, the tail mass off
    ratio = np.take_along_axis(q, order, 1) / np.take_along_axis(q, order, 1).sum(1, keepdims=True)
    true_ratio = np.take_along_axis(direct, order, 1) / np.take_along_axis(direct, order, 1).sum(1, keepdims=True)
    np.testing.assert_allclose(ratio, true_ratio, atol=2e-3)
    assert np.abs(q - direct).sum(1).max() > 1e-3


def test_fidelity_report_and_live_kl(built, tmp_path):
    """``cit cache info --fidelity``: the distributions are those of the stored rows; KL(live ‖ cached) equals the
    direct float64 KL from the full logits to the documented target (top-k exact + uniform tail)."""
    png = tmp_path / "f.png"
    args = ["info", built["url"], "--fidelity", "--sample", str(N), "--teacher", f"t={built['teacher']}",
            "--data", built["data"], "--png", str(png), "--device", "cpu", "--json"]
    result = CliRunner().invoke(cache_cli, args)
    assert result.exit_code == 0, result.output
    import json
    report = json.loads(result.output[:result.output.rindex("}") + 1])
    t = report["teachers"]["t"]
    full = built["logits"]
    p1 = _softmax(full).max(1)
    assert t["top1_probability"]["max"] == pytest.approx(p1.max(), abs=1e-3)
    assert t["top1_probability"]["p50"] == pytest.approx(np.median(p1), abs=1e-3)
    for tau in TEMPS:
        p = _softmax(full / tau)
        q = _direct_target(full, K, tau)
        kl = (p * (np.log(p) - np.log(q))).sum(1)
        got = t["kl_live_vs_cached"][f"{tau:g}"]
        assert got["mean"] == pytest.approx(kl.mean(), abs=1e-3) and got["max"] == pytest.approx(kl.max(), abs=1e-3)
        assert t["tail_mass"][f"{tau:g}"]["mean"] == pytest.approx(1 - np.sort(p, 1)[:, -K:].sum(1).mean(), abs=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = CliRunner().invoke(cache_cli, ["info", built["url"], "--fidelity", "--png", str(png)])
    assert text.exit_code == 0 and "top-k coverage τ=2" in text.output and "tail mass τ=4" in text.output
    refused = CliRunner().invoke(cache_cli, ["info", built["url"], "--fidelity", "--teacher", "t=x.pt"])
    assert refused.exit_code == 2 and "needs --data" in refused.output


@pytest.mark.parametrize("bad", ["0", "1,x", "-2", ""])
def test_bad_temperatures_are_refused_with_exit_code_2(bad, tmp_path):
    args = ["build", "--data", str(tmp_path / "none.json"), "--teacher", "t=x.pt", "--views", "1",
            "--temperatures", bad, "--out", str(tmp_path / "c.zarr")]
    result = CliRunner().invoke(cache_cli, args)
    assert result.exit_code == 2 and "--temperatures" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.zarr").exists()


def test_verify_checks_every_cached_temperature(built, tmp_path):
    import shutil
    import zarr
    from cache_builder import verify_cache
    report = verify_cache(built["url"], data=built["data"], recompute=8)
    assert report.ok, report.text()
    # a tail mass at τ = 4 below the one at τ = 2: impossible for a top-k, seen without a recompute
    bad = str(tmp_path / "bad.zarr")
    shutil.copytree(built["url"], bad)
    g = zarr.open_group(bad, mode="r+")
    tail = g["t/tail"][0, 0:20]
    tail[:, 2] = tail[:, 1] - 0.5
    g["t/tail"][0, 0:20] = tail
    assert any(p.startswith("mass") and "shrinks" in p for p in verify_cache(bad).problems)
    # a changed tail at τ = 2 that stays consistent: only the recompute sees it
    shutil.rmtree(bad)
    shutil.copytree(built["url"], bad)
    g = zarr.open_group(bad, mode="r+")
    tail = g["t/tail"][0, 0:20].astype(np.float32)
    tail[:, 1] = np.minimum(tail[:, 1] + 0.05, tail[:, 2])
    g["t/tail"][0, 0:20] = tail.astype(np.float16)
    report = verify_cache(bad, data=built["data"], recompute=N)
    assert any("tail mass at τ=2" in p for p in report.problems), report.text()


def test_log1mexp_against_float64_math():
    """log(1 − eˣ) in fp32 against float64 ``math`` on the same (fp32) inputs: within fp32 rounding (1e-7 relative,
    1e-7 absolute where the result is small) from x = −1e-7 to −100; −inf at 0 and 0 at −inf."""
    import math
    from shared.targets import log1mexp
    x = torch.tensor([-1e-7, -1e-4, -0.1, -0.5, -math.log(2), -1.0, -3.0, -10.0, -17.0, -30.0, -100.0])
    got = log1mexp(x).double()
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.double().tolist()], dtype=torch.float64)
    assert ((got - want).abs() <= 1e-7 * want.abs().clamp_min(1.0)).all(), (got - want).abs().max()
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf and log1mexp(torch.tensor([-math.inf])).item() == 0.0
