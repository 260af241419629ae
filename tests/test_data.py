"""Data preparation: Fashion-MNIST / ImageFolder / scan -> shards + manifest, corruptions, CLI, bad input."""
from __future__ import annotations

import gzip
import logging
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from shared.cli import main as cli
from shared.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from shared.manifest import Manifest, ManifestError, ShardInfo, file_sha256, verify_shards
from shared.prepare import PrepareError, prepare_fashion_mnist, prepare_image_folder, read_idx, scan_shards
from shared.reader import Piece, ShardStream, read_piece
from shared.shards import ShardError, decode_image, iter_shard
from tests.conftest import good_sample, idx_bytes, write_samples

REAL_FMNIST = os.environ.get("CIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def read_all(manifest: Manifest) -> dict[str, tuple[int, dict]]:
    """key -> (label, raw sample) over every shard, in manifest order."""
    out = {}
    for i in range(len(manifest.shards)):
        for sample in iter_shard(manifest.shard_url(i)):
            out[sample["__key__"]] = (int(sample["cls"]), sample)
    return out


def manifests_under(folder) -> list:
    return sorted(str(p) for p in folder.rglob("*.json"))


def snapshot(paths) -> dict:
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason=f"real Fashion-MNIST not installed at {REAL_FMNIST} "
                                                           "(Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    """The real IDX files through the real parser: 30 train images per class (all 60,000 are read to choose them,
    encoding them all would only cost time), the complete test split."""
    manifests = prepare_fashion_mnist(REAL_FMNIST, str(tmp_path / "fm"), shard_size=3000, per_class=30,
                                      workers=1)     # one process is faster here; the pool: fake-file tests
    rng = np.random.default_rng(0)
    for split, prefix, n in (("train", "train", 300), ("test", "t10k", 10000)):
        manifest = Manifest.load(str(tmp_path / "fm" / f"{split}.json"))
        assert manifest.num_samples == n and manifest.fingerprint == manifests[split].fingerprint
        assert manifest.num_classes == 10 and manifest.class_names[9] == "Ankle boot"
        assert manifest.source["image_size"] == 28 and manifest.source["channels"] == 1
        images = read_idx(f"{REAL_FMNIST}/{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(f"{REAL_FMNIST}/{prefix}-labels-idx1-ubyte.gz")
        assert len(labels) == {"train": 60000, "test": 10000}[split]
        keys = [s["__key__"] for i in range(len(manifest.shards)) for s in iter_shard(manifest.shard_url(i))]
        if split == "train":
            assert np.bincount(labels[[int(k.split("_")[1]) for k in keys]], minlength=10).tolist() == [30] * 10
        rows = {k: int(k.split("_")[1]) for k in rng.choice(keys, 50, replace=False)}
        found = 0
        for shard in range(len(manifest.shards)):
            for sample in iter_shard(manifest.shard_url(shard)):
                if sample["__key__"] in rows:
                    i = rows[sample["__key__"]]
                    assert int(sample["cls"]) == labels[i]
                    assert np.array_equal(np.asarray(decode_image(sample["png"])), images[i])
                    found += 1
        assert found == 50


def test_fake_fashion_mnist_fingerprint_stable_and_sensitive(fake_fashion_mnist, tmp_path, caplog):
    caplog.set_level(logging.INFO, "shared.prepare")
    a = prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / "a"), shard_size=64, workers=1)
    b = prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / "b"), shard_size=64, workers=2)
    assert {k: m.fingerprint for k, m in a.items()} == {k: m.fingerprint for k, m in b.items()}
    train = Manifest.load(str(tmp_path / "a" / "train.json"))
    assert [s.samples for s in train.shards] == [64, 64, 64, 8] and train.num_samples == 200
    data = read_all(train)
    assert list(data) == [f"train_{i:06d}" for i in range(200)]          # source order, keys without dots
    assert [label for label, _ in data.values()] == list(fake_fashion_mnist.train_labels)
    assert np.array_equal(np.asarray(decode_image(data["train_000007"][1]["png"])), fake_fashion_mnist.train_images[7])
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".partial")]

    # same input and options again: skipped, files untouched
    files = snapshot([str(p) for p in (tmp_path / "a").rglob("*") if p.is_file()])
    again = prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / "a"), shard_size=64, workers=1)
    assert again["train"].fingerprint == a["train"].fingerprint and "already prepared" in caplog.text
    assert snapshot(list(files)) == files
    # other options: refused without force, replaced with it
    with pytest.raises(PrepareError, match="train.json exists and was made from different input or options"):
        prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / "a"), shard_size=100, workers=1)
    forced = prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / "a"), shard_size=100, workers=1,
                                   force=True)
    assert [s.samples for s in forced["train"].shards] == [100, 100]
    verify_shards(Manifest.load(str(tmp_path / "a" / "train.json")))

    # any change to a shard's bytes changes the fingerprint, and verify_shards names the shard
    shard = b["train"].shard_url(2)
    with open(shard, "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 1]))
    changed = Manifest([ShardInfo(s.url, s.samples, file_sha256(b["train"].shard_url(i)))
                        for i, s in enumerate(b["train"].shards)], 10, b["train"].class_names)
    assert changed.fingerprint != b["train"].fingerprint
    with pytest.raises(ManifestError, match="shard-000002.tar does not match manifest"):
        verify_shards(Manifest.load(str(tmp_path / "b" / "train.json")))


def test_per_class_subset(fake_fashion_mnist, tmp_path):
    def keys(seed: int, out: str) -> list[str]:
        manifests = prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / out), 16, per_class=5,
                                          seed=seed, workers=1)
        assert manifests["test"].num_samples == 50                        # the test split stays complete
        data = read_all(manifests["train"])
        assert np.bincount([label for label, _ in data.values()], minlength=10).tolist() == [5] * 10
        for key, (label, _) in data.items():                              # labels still match the source rows
            assert fake_fashion_mnist.train_labels[int(key.split("_")[1])] == label
        return list(data)

    first = keys(0, "s0")
    assert keys(0, "s0-again") == first
    assert keys(1, "s1") != first
    with pytest.raises(PrepareError, match=r"class 0 \('T-shirt/top'\) has only 20 samples, fewer than per_class=21"):
        prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path / "big"), 16, per_class=21, workers=1)
    assert not (tmp_path / "big").exists()


def test_corrupted_test_sets(fake_fashion_mnist, tmp_path):
    manifests = prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path), 64, corruptions=True,
                                      severities=(2, 5), workers=2)
    assert sorted(manifests) == sorted(["train", "test"] + [f"corrupt/{c}-{s}" for c in CORRUPTIONS for s in (2, 5)])
    test = read_all(manifests["test"])
    for name in CORRUPTIONS:
        path = tmp_path / "corrupt" / f"{name}-5.json"
        corrupted = read_all(Manifest.load(str(path)))
        assert [(k, y) for k, (y, _) in corrupted.items()] == [(k, y) for k, (y, _) in test.items()]
        key = "test_000003"
        expected = corrupt(name, fake_fashion_mnist.test_images[3], 5, 0, key)
        assert np.array_equal(np.asarray(decode_image(corrupted[key][1]["png"])), expected)
        assert Manifest.load(str(path)).source["corruption"] == name


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_functions(name):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    for image in (grey, rgb):
        before = image.copy()
        for severity in SEVERITIES:
            out = corrupt(name, image, severity, seed=3, key="k1")
            assert out.shape == image.shape and out.dtype == np.uint8
            assert not np.array_equal(out, image), (name, severity, image.shape)
            assert np.array_equal(out, corrupt(name, image, severity, seed=3, key="k1"))     # deterministic
        assert np.array_equal(image, before)                                               # input untouched
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(name, grey, 6)


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder and scan

def test_image_folder(image_folder_tree, tmp_path):
    manifest = prepare_image_folder(image_folder_tree, str(tmp_path / "out"), "train", shard_size=10, seed=1,
                                    workers=1)
    assert manifest.class_names == ["cat", "dog", "fish"] and manifest.num_samples == 24
    assert [s.samples for s in manifest.shards] == [10, 10, 4]
    assert manifest.source["ignored_files"] == 3                          # notes.txt
    assert manifest.source["fields"] == {"png": 18, "jpg": 6}              # BMP re-encoded as PNG
    data = read_all(Manifest.load(str(tmp_path / "out" / "train.json")))
    assert len(data) == 24 and not any("." in k for k in data)
    assert {"cat_a_b", "cat_a_b_1", "dog_nested_img_5", "fish_img_1"} <= set(data)
    assert {label for key, (label, _) in data.items() if key.startswith("dog_")} == {1}
    with open(os.path.join(image_folder_tree, "fish", "img 1.jpg"), "rb") as f:
        assert data["fish_img_1"][1]["jpg"] == f.read()                    # JPEG kept byte for byte
    first_shard = [label for label, sample in data.values() if sample["__url__"].endswith("shard-000000.tar")]
    assert len(set(first_shard)) > 1                                       # shuffled: shards mix classes
    subset = prepare_image_folder(image_folder_tree, str(tmp_path / "out"), "small", 4, per_class=2, workers=1)
    assert subset.num_samples == 6 and subset.path.endswith("small.json")


def test_scan_valid_shards_untouched(small_shards, tmp_path):
    before = snapshot(small_shards)
    manifest = scan_shards(str(tmp_path / "third-party" / "part-*.tar"))
    assert manifest.path == str(tmp_path / "third-party" / "manifest.json")
    assert snapshot(small_shards) == before
    assert manifest.num_samples == 24 and manifest.num_classes == 4 and manifest.skipped == []
    assert [s.url for s in manifest.shards] == ["part-000.tar", "part-001.tar", "part-002.tar"]
    loaded = Manifest.load(manifest.path)
    verify_shards(loaded)
    assert sorted(r.key for r in ShardStream(loaded, seed=0)) == [f"img_{i:04d}" for i in range(24)]
    assert scan_shards(small_shards, manifest.path).fingerprint == manifest.fingerprint     # idempotent
    other = scan_shards(small_shards, str(tmp_path / "elsewhere" / "m.json"), num_classes=10)
    assert other.shards[0].url == small_shards[0] and other.num_classes == 10              # absolute outside


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the culprit, and no manifest left behind

def test_missing_source_folder(tmp_path):
    with pytest.raises(PrepareError, match=f"source folder not found: {tmp_path}/nope"):
        prepare_fashion_mnist(str(tmp_path / "nope"), str(tmp_path / "out"), 64)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["cut gzip stream", "short payload"])
def test_truncated_idx(fake_fashion_mnist, tmp_path, how):
    source = tmp_path / "src"
    shutil.copytree(fake_fashion_mnist.folder, source)
    path = source / "t10k-images-idx3-ubyte.gz"
    if how == "cut gzip stream":
        path.write_bytes(path.read_bytes()[:-500])
        match = "cannot read IDX file .*t10k-images-idx3-ubyte.gz .*truncated"
    else:
        path.write_bytes(gzip.compress(idx_bytes(fake_fashion_mnist.test_images)[:-28 * 28 * 3]))
        match = "IDX file .*t10k-images-idx3-ubyte.gz has .* bytes but its header .* says .*: truncated"
    with pytest.raises(PrepareError, match=match):
        prepare_fashion_mnist(str(source), str(tmp_path / "out"), 64)
    assert not (tmp_path / "out").exists() or not manifests_under(tmp_path / "out")


def test_interrupted_prepare_leaves_no_manifest(fake_fashion_mnist, tmp_path, monkeypatch):
    import shared.prepare as prepare
    calls = {"n": 0}

    def failing(image):
        calls["n"] += 1
        if calls["n"] > 150:
            raise RuntimeError("disk full")
        return real(image)
    real = prepare.encode_png
    monkeypatch.setattr(prepare, "encode_png", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_fashion_mnist(fake_fashion_mnist.folder, str(tmp_path), 64, workers=1)
    assert os.listdir(tmp_path) == []                                       # no manifest, no shards, no staging


def test_corrupt_png_in_shard(small_shards, tmp_path):
    bad = small_shards[1]
    samples = list(iter_shard(bad))
    samples[3]["png"] = samples[3]["png"][:40]                               # truncated PNG
    for s in samples:
        s.pop("__url__")
    os.unlink(bad)
    write_samples(bad, samples)
    out = str(tmp_path / "m.json")
    with pytest.raises(ShardError, match=f"cannot decode image of key 'img_0011' in shard {bad}"):
        scan_shards(small_shards, out)
    assert not os.path.exists(out)

    manifest = scan_shards(small_shards, out, skip_bad=True)
    assert manifest.skipped == [{"shard": "third-party/part-001.tar", "key": "img_0011",
                                 "reason": manifest.skipped[0]["reason"]}]
    assert [s.samples for s in manifest.shards] == [8, 7, 8] and manifest.num_samples == 23
    keys = [r.key for r in ShardStream(Manifest.load(out), seed=0)]
    assert len(keys) == 23 and "img_0011" not in keys                       # the reader skips it


def test_key_with_dot(tmp_path):
    shard = write_samples(str(tmp_path / "dots.tar"), [good_sample("ok_1", 0), good_sample("bad.key", 1)])
    with pytest.raises(ShardError, match=f"sample key 'bad.key' in shard {shard} contains a dot"):
        scan_shards(shard, str(tmp_path / "m.json"))
    assert not os.path.exists(tmp_path / "m.json")


def test_cls_out_of_range(small_shards, tmp_path):
    with pytest.raises(ShardError, match=f"sample 'img_0003' in shard {small_shards[0]} has cls=3, outside 0..2"):
        scan_shards(small_shards, str(tmp_path / "m.json"), num_classes=3)
    assert not os.path.exists(tmp_path / "m.json")


def test_shard_missing_from_disk(small_shards, tmp_path):
    manifest = scan_shards(small_shards, str(tmp_path / "third-party" / "m.json"))
    os.unlink(small_shards[2])
    with pytest.raises(ManifestError, match=f"shard {small_shards[2]} listed in manifest .*m.json does not exist"):
        verify_shards(manifest)
    with pytest.raises(ShardError, match=f"shard not found: {small_shards[2]}"):
        read_piece(manifest, Piece(2, manifest.shards[2].start, manifest.shards[2].stop))


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_cli(fake_fashion_mnist, small_shards, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "fm")
    result = runner.invoke(cli, ["data", "prepare", "fashion-mnist", "--source", fake_fashion_mnist.folder,
                                 "--out", out, "--shard-size", "100", "--per-class", "3", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"{out}/train.json: 30 samples, 10 classes, 1 shards, fingerprint" in result.output
    result = runner.invoke(cli, ["data", "info", f"{out}/test.json", "--verify"])
    assert result.exit_code == 0 and "samples: 50" in result.output and "verified" in result.output
    result = runner.invoke(cli, ["data", "prepare", "scan", *small_shards, "--out", str(tmp_path / "s.json"),
                                 "--num-classes", "2"])
    assert result.exit_code == 2 and "Error: sample 'img_0002'" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["data", "prepare", "fashion-mnist", "--source", str(tmp_path / "nope"), "--out", out])
    assert result.exit_code == 2 and result.output.startswith("Error: Fashion-MNIST source folder not found")
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "data" in result.output
