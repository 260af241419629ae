"""Replay: a view is a pure function of (spec, seed, key, v) — across processes, workers and runs."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shared.augment import RAND_OPS, ViewParams, ViewSpec, apply_view, box_pixels, sample_view
from shared.manifest import Manifest
from shared.reader import ShardStream
from shared.views import render_view
from tests.shard_fixtures import make_shards

SPEC = ViewSpec(image_size=28, erase_prob=0.5, mean=(0.3,), std=(0.35,))


def digest_views(manifest_path: str, workers: int, view: int) -> dict[str, str]:
    """sha256 of every view's bytes, keyed by sample key, read through a DataLoader."""
    manifest = Manifest.load(manifest_path)
    stream = ShardStream(manifest, seed=3, rank=0, world=1)

    def render(raw):
        tensor, record = render_view(SPEC, 7, view, raw)
        return raw.key, hashlib.sha256(tensor.numpy().tobytes() + record.tobytes()).hexdigest()

    class Rendered(torch.utils.data.IterableDataset):
        def __iter__(self):
            return map(render, stream)

    loader = DataLoader(Rendered(), batch_size=None, num_workers=workers)
    return dict(loader)


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(str(folder), num_samples=40, shard_size=12)
    return str(folder / "s.json")


def test_same_view_across_worker_counts(manifest_path):
    by_workers = [digest_views(manifest_path, w, view=1) for w in (0, 1, 2)]
    assert len(by_workers[0]) == 40
    assert by_workers[0] == by_workers[1] == by_workers[2]


def test_same_view_in_another_process(manifest_path):
    here = digest_views(manifest_path, 0, view=2)
    code = ("import json, sys; from tests.test_views import digest_views; "
            f"print(json.dumps(digest_views({manifest_path!r}, 0, 2)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_different_views_differ(manifest_path):
    v0, v1 = digest_views(manifest_path, 0, 0), digest_views(manifest_path, 0, 1)
    assert all(v0[k] != v1[k] for k in v0)


def test_params_round_trip_and_determinism():
    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()
    from PIL import Image
    pil = Image.fromarray(image)
    for v in range(50):
        params = sample_view(SPEC, 0, "key", v)
        record = params.encode(SPEC)
        assert record.dtype == np.float32 and record.shape == (SPEC.num_params,)
        assert ViewParams.decode(record, SPEC) == params
        assert torch.equal(apply_view(SPEC, pil, params), apply_view(SPEC, pil, ViewParams.decode(record, SPEC)))
        assert sample_view(SPEC, 0, "key", v) == params
    assert sample_view(SPEC, 1, "key", 0) != sample_view(SPEC, 0, "key", 0)
    assert sample_view(SPEC, 0, "key2", 0) != sample_view(SPEC, 0, "key", 0)


def test_every_op_is_reachable_and_changes_pixels():
    from PIL import Image
    ramp = np.random.default_rng(0).integers(40, 200, (28, 28), dtype=np.uint8)
    pil = Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=2))  # RGB, so Color is not a no-op
    seen = {op for v in range(400) for op, _ in sample_view(SPEC, 0, "k", v).ops if op >= 0}
    assert seen == set(range(len(RAND_OPS)))
    plain = ViewParams()
    base = apply_view(SPEC, pil, plain)
    assert base.shape == (3, 28, 28)
    for op in range(len(RAND_OPS)):
        out = apply_view(SPEC, pil, ViewParams(ops=[(op, 7.0)]))
        assert out.shape == base.shape and out.dtype == torch.uint8
        assert not torch.equal(out, base), RAND_OPS[op][0]


def test_boxes_stay_inside_image():
    rng = np.random.default_rng(0)
    for _ in range(500):
        box = (rng.uniform(0.01, 1), rng.uniform(-1.5, 1.5), rng.uniform(), rng.uniform())
        h_img, w_img = rng.integers(5, 60, 2)
        top, left, h, w = box_pixels(box, int(h_img), int(w_img))
        assert 0 <= top and top + h <= h_img and 0 <= left and left + w <= w_img and h >= 1 and w >= 1


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="hflip"):
        ViewSpec(hflip=1.5)
    with pytest.raises(ValueError, match="unknown augmentation option"):
        ViewSpec.from_dict({"img_size": 3})


@pytest.mark.parametrize("level", [-10.0, -0.0, 0.0, 10.0])
def test_every_op_renders_at_extreme_levels(level):
    """Magnitudes are clipped to [0, 10]: every op must render at both ends (PIL posterize rejects 0 bits)."""
    from PIL import Image
    rng = np.random.default_rng(1)
    for mode_shape in ((28, 28), (20, 24, 3)):
        pil = Image.fromarray(rng.integers(0, 256, mode_shape, dtype=np.uint8))
        for op in range(len(RAND_OPS)):
            out = apply_view(SPEC, pil, ViewParams(ops=[(op, level)]))
            assert out.dtype == torch.uint8 and out.shape[1:] == (28, 28)
