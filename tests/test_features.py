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


def test_a_features_cache_and_a_plain_one_are_never_confused(world, tmp_path):
    out = build(world, str(tmp_path / "plain.zarr"), views=1, features="")
    with pytest.raises(BuildError, match=r"already holds a different cache \(.*features: \"\" vs \"pooled\""):
        build(world, out, views=1)
    a, b = LogitCache.open(out).attrs, LogitCache.open(world["cache"]).attrs
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
