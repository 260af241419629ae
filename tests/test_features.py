"""Pooled teacher features in the cache (``cit cache build --features pooled``): the stored features are the
teacher's live pooled features to the stored rounding, the targets beside them are those of a build without
features, an extend equals a fresh build, and the identity keeps the two kinds of cache apart."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cache_builder import BuildError, build_cache, cache_info, format_info
from cache_builder.grow import GrowSettings, extend_cache
from shared.augment import ViewSpec, to_model_input
from shared.cache_schema import TEACHER_ARRAYS, LogitCache
from shared.reader import pieces_for_rows, read_piece
from shared.views import LoadedRows, make_renderer
from tests.cache_fixtures import assert_bit_identical, make_teacher, store_arrays
from tests.shard_fixtures import make_shards

K, N, SHARD, BATCH, CHUNK = 3, 40, 20, 8, 20
SPEC = ViewSpec.from_dict({"image_size": 16, "erase_prob": 0.5, "mean": [0.4], "std": [0.3]})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    data = make_shards(str(root / "train"), num_samples=N, shard_size=SHARD, prefix="ft", seed=4)
    w = {"root": root, "data": data.path, "manifest": data,
         "conv": make_teacher(str(root / "conv.safetensors"), "conv", seed=1, mean=(0.4,), std=(0.3,)),
         "inv": make_teacher(str(root / "inv.safetensors"), "inv", seed=2, mean=(0.4,), std=(0.3,))}
    w["cache"] = build(w, str(root / "f2.zarr"), views=2)
    return w


def build(w, out: str, views: int, features: str = "pooled", **kw) -> str:
    build_cache(w["data"], [f"conv={w['conv']}", f"inv={w['inv']}"], out, views=views, topk=K, spec=SPEC, seed=5,
                batch_size=BATCH, workers=0, threads=1, chunk_rows=CHUNK, progress=False, features=features, **kw)
    return out


def live_pooled(w, name: str, view: int) -> np.ndarray:
    """The teacher's pooled features of every row's view, computed here from the checkpoint and the renderer."""
    from shared.checkpoint import load_checkpoint
    model, _ = load_checkpoint(w[name], expect_classes=10)
    manifest = w["manifest"]
    rows = LoadedRows([s for p in pieces_for_rows(manifest, 0, N) for s in read_piece(manifest, p)])
    renderer = make_renderer(SPEC, 5, manifest)
    views = torch.stack([renderer.render(view, rows, r).pixels for r in range(N)])
    with torch.no_grad():
        x = to_model_input(views, (0.4,), (0.3,))
        return model.eval().forward_head(model.forward_features(x), pre_logits=True).numpy()


def test_stored_features_are_the_live_pooled_features_to_the_stored_rounding(world):
    cache = LogitCache.open(world["cache"])
    assert cache.attrs.features == "pooled"
    g = zarr.open_group(world["cache"], mode="r")
    for name in ("conv", "inv"):
        assert cache.attrs.teacher(name).feature_dim == g[f"{name}/features"].shape[2] == 128
        assert g[f"{name}/features"].dtype == np.uint8
        for view in range(2):
            live = live_pooled(world, name, view)
            stored = cache.read_features(name, view, 0, N)
            step = np.asarray(g[f"{name}/feature_scale"][view])[:, 1:2]
            assert (live >= 0).all() and step.max() > 0
            assert np.all(np.abs(stored - live) <= step / 2 * 1.001 + 1e-6)
            rel = np.linalg.norm(stored - live, axis=1) / np.linalg.norm(live, axis=1)
            assert rel.max() < 0.01


def test_verify_recomputes_the_features_and_finds_a_changed_one(world, tmp_path):
    import shutil

    from cache_builder import verify_cache
    report = verify_cache(world["cache"], data=world["data"], recompute=6)
    assert report.ok and "pooled features match" in " ".join(report.passed)
    copy = str(tmp_path / "changed.zarr")
    shutil.copytree(world["cache"], copy)
    g = zarr.open_group(copy, mode="r+")
    codes = np.asarray(g["inv/features"][...])
    codes[:, :, 0] = 255 - codes[:, :, 0]           # every view's first feature, far from the teacher's
    g["inv/features"][...] = codes
    report = verify_cache(copy, data=world["data"], recompute=4)
    assert not report.ok and "teacher inv" in " ".join(report.problems) and "pooled features differ" in \
        " ".join(report.problems)


def test_the_targets_beside_the_features_are_those_of_a_build_without(world, tmp_path):
    plain = store_arrays(build(world, str(tmp_path / "plain.zarr"), views=2, features=""))
    with_features = store_arrays(world["cache"])
    assert sorted(set(with_features) - set(plain)) == sorted(
        f"{t}/{a}" for t in ("conv", "inv") for a in ("features", "feature_scale"))
    for path, array in plain.items():
        if path.split("/")[-1] in TEACHER_ARRAYS + ("params", "digest"):
            assert np.array_equal(array.view(f"u{array.itemsize}"),
                                  with_features[path].view(f"u{array.itemsize}")), path


def test_extend_of_a_features_cache_equals_a_fresh_build(world, tmp_path):
    grown = build(world, str(tmp_path / "grown.zarr"), views=1)
    extend_cache(grown, 2, GrowSettings(data=world["data"], workers=0, progress=False))
    assert_bit_identical(grown, world["cache"])


def test_add_teacher_and_merge_carry_the_features(world, tmp_path):
    from cache_builder import add_teachers, merge_caches
    one = {}
    for name in ("conv", "inv"):
        one[name] = str(tmp_path / f"{name}.zarr")
        build_cache(world["data"], [f"{name}={world[name]}"], one[name], views=2, topk=K, spec=SPEC, seed=5,
                    batch_size=BATCH, workers=0, threads=1, chunk_rows=CHUNK, progress=False, features="pooled")
    merged = str(tmp_path / "merged.zarr")
    merge_caches(one["conv"], one["inv"], merged)
    assert_bit_identical(merged, world["cache"])
    add_teachers(one["conv"], [f"inv={world['inv']}"], GrowSettings(data=world["data"], workers=0, progress=False))
    assert_bit_identical(one["conv"], world["cache"])


def test_a_features_cache_and_a_plain_one_are_never_confused(world, tmp_path):
    out = build(world, str(tmp_path / "plain.zarr"), views=1, features="")
    with pytest.raises(BuildError, match=r"already holds a different cache \(.*features: \"\" vs \"pooled\""):
        build(world, out, views=1)
    a, b = LogitCache.open(out).attrs, LogitCache.open(world["cache"]).attrs
    from cache_builder import merge_caches
    with pytest.raises(BuildError, match="they differ in features"):
        merge_caches(out, world["cache"], str(tmp_path / "never.zarr"))
    assert "features" in " ".join(a.identity_diff(b))
    info = cache_info(world["cache"])
    assert info["features"] == "pooled" and info["feature_bytes_per_view"] > 0
    assert "features     pooled:" in format_info(info) and "D=128" in format_info(info)
    assert "features     none" in format_info(cache_info(out))


def test_a_teacher_without_pooled_features_is_refused_before_anything_is_written(world, tmp_path):
    from shared.checkpoint import save_checkpoint
    from shared.models import create_model
    torch.manual_seed(0)
    cit = create_model("cit_nano", num_classes=10, in_chans=1, img_size=16)
    path = str(tmp_path / "cit.safetensors")
    save_checkpoint(cit.eval(), path, {"kind": "other", "mean": [0.4], "std": [0.3]})
    out = tmp_path / "refused.zarr"
    with pytest.raises(BuildError, match="teacher t .*--features pooled needs its pooled features"):
        build_cache(world["data"], [f"t={path}"], str(out), views=1, topk=K, spec=SPEC, seed=5, workers=0,
                    threads=1, progress=False, features="pooled")
    assert not out.exists()


# -----------------------------------------------------------------------------------------------------------------
# Feature and relation KD in the trainer, from the cache built above

TINY_CIT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 32}


def run_config(w, *extra: str, mode: str = "cached"):
    import json

    from trainer.config import load_run_config
    sets = [f"data.train={json.dumps(w['data'])}", f"data.cache={json.dumps(w['cache'])}", "data.view_seed=5",
            "data.num_workers=0", "augment.image_size=16", "augment.erase_prob=0.5", "augment.mean=[0.4]",
            "augment.std=[0.3]", "train.epochs=2", "train.batch_size=10", "train.progress=false",
            f"kd.mode={mode}", 'kd.conv_teacher="conv"', 'kd.inv_teacher="inv"',
            *(f"student.options.{k}={v}" for k, v in TINY_CIT.items()), *extra]
    return load_run_config(None, sets)


def first_batch(p):
    p.train_set.set_epoch(0)
    return next(iter(p.train_set))


def test_cached_feature_kd_equals_online_feature_kd_on_the_same_views(world):
    """The same batch through both sources: the cached (decoded) teacher features are the live ones to the stored
    rounding; the loss of one student output against both agrees to that rounding's tolerance; and against the
    live features rounded like the cache it is the same to float32 precision."""
    from shared.features import decode_features, encode_features
    from trainer import train as train_mod
    extra = ("objective.feature_weight=1.0", "objective.relation_weight=2.0")
    cached = train_mod.prepare(run_config(world, *extra))
    online = train_mod.prepare(run_config(world, *extra, mode="online"))
    batch = first_batch(cached)
    assert torch.equal(batch.views, first_batch(online).views)
    a, b = cached.loss_fn.source(batch), online.loss_fn.source(batch)
    for name in ("conv", "inv"):
        live = b.pooled(name)
        codes, scale = encode_features(live)
        assert torch.allclose(a.pooled(name), decode_features(codes, scale), rtol=1e-6, atol=1e-6)
        assert torch.all((a.pooled(name) - live).abs() <= scale[:, 1:] / 2 * 1.001 + 1e-6)
    student = cached.student.train()
    outputs = student(to_model_input(batch.views, (0.4,), (0.3,)))
    la, pa = cached.loss_fn.objective(outputs, a, 0)
    lb, pb = online.loss_fn.objective(outputs, b, 0)
    for key in ("feat_conv", "feat_inv", "rel_conv", "rel_inv", "kd_conv", "kd_inv"):
        assert pa[key].item() == pytest.approx(pb[key].item(), rel=1e-2, abs=1e-5), key
    assert la.item() == pytest.approx(lb.item(), rel=1e-3)
    import dataclasses
    rounded = dataclasses.replace(b, features={n: decode_features(*encode_features(b.pooled(n))) for n in b.features},
                                  _memo={})
    _, pr = online.loss_fn.objective(outputs, rounded, 0)
    for key in ("feat_conv", "feat_inv", "rel_conv", "rel_inv"):    # rounded like the cache: the same terms
        assert pr[key].item() == pytest.approx(pa[key].item(), rel=1e-5, abs=1e-7), key
    assert set(dict(student.named_parameters())) >= {"projections.conv.weight", "projections.inv.weight"}


def test_the_join_reads_the_features_in_its_one_block_read_per_piece(world):
    from trainer import train as train_mod
    from trainer.data import Batch
    p = train_mod.prepare(run_config(world, "objective.feature_weight=1.0"))
    p.train_set.set_epoch(1)
    p.train_set.reads = 0
    batch = Batch.cat(list(p.train_set))
    assert p.train_set.reads == len(p.train_set.stream.pieces()) * (2 + 2 * 5)   # params, digests + 5 per teacher
    cache = LogitCache.open(world["cache"])
    got = batch.teacher_features(["conv", "inv"], [128, 128])
    for name in ("conv", "inv"):
        assert torch.equal(got[name], torch.from_numpy(cache.read_features(name, 1, 0, N))[batch.rows])


def test_feature_terms_compose_with_one_head_kd_on_the_class_token(world):
    from trainer import train as train_mod
    p = train_mod.prepare(run_config(world, 'objective.recipe="kd"', "objective.feature_weight=1.0",
                                     "objective.relation_weight=1.0"))
    assert p.student.pairs == [("conv", "cls"), ("inv", "cls")]
    loss, parts = p.loss_fn(p.student.train(), first_batch(p))
    assert torch.isfinite(loss) and {"ce", "kd", "feat_conv", "feat_inv", "rel_conv", "rel_inv"} <= set(parts)
    loss.backward()
    assert p.student.projections["inv"].weight.grad.abs().sum() > 0


def test_relation_kd_is_the_mse_of_the_batch_cosine_matrices():
    from trainer.objectives import relation_kd
    rng = np.random.default_rng(0)
    s, f = rng.normal(size=(6, 5)), np.abs(rng.normal(size=(6, 7)))
    cos = lambda x: (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))  # noqa: E731
    expected = ((cos(s) - cos(f)) ** 2).mean()
    got = relation_kd(torch.from_numpy(s).float(), torch.from_numpy(f).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_features_are_refused_with_one_clear_line(world, tmp_path):
    from click.testing import CliRunner

    from shared.cli import main as cit
    from shared.config import ConfigError
    from trainer import train as train_mod
    plain = build(world, str(tmp_path / "plain.zarr"), views=2, features="")
    args = ["train", "--data", world["data"], "--cache", plain, "--out", str(tmp_path / "run"),
            "--conv-teacher", "conv", "--inv-teacher", "inv", "--set", "objective.feature_weight=1",
            "--set", "data.view_seed=5", "--set", "augment.image_size=16", "--set", "augment.erase_prob=0.5",
            "--set", "augment.mean=[0.4]", "--set", "augment.std=[0.3]", "--set", "train.epochs=2"]
    result = CliRunner().invoke(cit, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert len(line) == 1 and f"cache {plain} stores no teacher features" in line[0]
    assert "--features pooled" in line[0]
    with pytest.raises(ConfigError, match="not defined with augment.mix=approx"):
        train_mod.prepare(run_config(world, "objective.relation_weight=1", "augment.mix=\"approx\""))
    with pytest.warns(UserWarning, match="ignored"), pytest.raises(ConfigError, match="kd.mode=none has no teacher"):
        train_mod.prepare(run_config(world, "objective.feature_weight=1", mode="none"))


def test_feature_kd_projection_resumes_exactly_after_kill(world, tmp_path):
    """kill -9 mid-run with feature + relation KD: the resumed run's student, projections and optimiser state equal
    an uninterrupted run's bit for bit."""
    import json
    import multiprocessing
    import signal

    from trainer import train as train_mod
    from trainer.engine import load_state
    extra = ("objective.feature_weight=0.5", "objective.relation_weight=1.0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_mod.train(run_config(world, *extra), str(tmp_path / "full"))
        child = multiprocessing.get_context("fork").Process(
            target=train_mod.train, args=(run_config(world, *extra, "train.debug_kill_at_step=6"),
                                          str(tmp_path / "cut")), daemon=True)
        child.start()
        child.join(120)
        assert child.exitcode == -signal.SIGKILL                # 4 steps per epoch: died inside epoch 1
        train_mod.train(run_config(world, *extra), str(tmp_path / "cut"), resume=True)
    finally:
        torch.set_num_threads(threads)
    a, b = (load_state(str(tmp_path / run / "state.safetensors"))[0] for run in ("full", "cut"))
    assert any(k.startswith("model.projections.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in open(tmp_path / "cut/metrics.jsonl")]
    assert all(r["train_feat_conv"] > 0 and r["train_rel_inv"] > 0 for r in lines)
    from shared import checkpoint
    model, _ = checkpoint.load_checkpoint(str(tmp_path / "cut/student.safetensors"), expect_classes=10)
    assert set(model.forward_heads(torch.zeros(1, 1, 16, 16))) == {"cls", "conv", "inv"}


@pytest.mark.parametrize("flag, stored", [(["--features", "pooled"], "pooled"), ([], "")])
def test_the_cli_flag_reaches_the_build_settings(monkeypatch, tmp_path, flag, stored):
    from click.testing import CliRunner

    import cache_builder.build
    from cache_builder.cli import cache as cache_cli
    seen = []

    def capture(settings):
        seen.append(settings)
        raise BuildError("captured")
    monkeypatch.setattr(cache_builder.build, "build_cache", capture)
    result = CliRunner().invoke(cache_cli, ["build", "--data", "d.json", "--teacher", "t=t.pt", "--views", "1",
                                            "--out", str(tmp_path / "c.zarr"), *flag])
    assert seen and seen[0].features == stored and "captured" in result.output
