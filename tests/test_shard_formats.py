"""Data as users bring it: images of any mode, shards written by GNU tar, webdataset URLs, the train-start shard
check and the dataset fingerprint."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shared.cli import main
from shared.manifest import Manifest, ManifestError, check_shards
from shared.prepare import scan_shards
from shared.shards import ShardError, decode_image, iter_shard
from tests.shard_fixtures import make_shards

GNU_TAR = shutil.which("tar")
needs_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar is not installed")


# ---------------------------------------------------------------------------------------------------------------
# Images of any mode -> the manifest's channel count; expected values computed here from the stored pixels

def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _raw(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma in PIL's fixed point: (R*19595 + G*38470 + B*7471 + 2**15) >> 16."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + (1 << 15)) >> 16).astype(np.uint8)


def _muldiv255(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    t = a.astype(np.int64) * b + 128
    return ((t + (t >> 8)) >> 8).astype(np.uint8)


def mode_images(seed: int = 0, h: int = 20, w: int = 24) -> dict[str, bytes]:
    """One encoded image per source mode a user's shards hold."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    return {"RGB": _encode(Image.fromarray(rgb), "JPEG", quality=90),
            "L": _encode(Image.fromarray(grey), "JPEG", quality=90),
            "CMYK": _encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=90),
            "RGBA": _encode(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), "PNG"),
            "LA": _encode(Image.fromarray(np.dstack([grey, alpha]), mode="LA"), "PNG"),
            "P": _encode(palette, "PNG"),
            "I;16": _encode(Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)), "PNG")}


def expected_rgb(mode: str, data: bytes) -> np.ndarray:
    raw = _raw(data)
    if mode == "RGB":
        return raw
    if mode in ("L", "LA"):
        grey = raw if mode == "L" else raw[..., 0]
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "CMYK":       # PIL's formula: (255 - C) * (255 - K) / 255, no ICC profile
        return np.dstack([_muldiv255(255 - raw[..., i], 255 - raw[..., 3]) for i in range(3)])
    if mode == "RGBA":       # alpha dropped, not composited (as timm's .convert("RGB"))
        return raw[..., :3]
    if mode == "P":
        image = Image.open(io.BytesIO(data))
        palette = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
        return palette[np.asarray(image)]
    if mode == "I;16":       # the high byte (PIL's convert would clip everything above 255 to white)
        return np.repeat((raw.astype(np.uint16) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    raise AssertionError(mode)


def test_every_mode_decodes_to_the_requested_channels_exactly():
    for mode, data in mode_images().items():
        assert Image.open(io.BytesIO(data)).mode == mode
        rgb = expected_rgb(mode, data)
        got3 = decode_image(data, "s.tar", f"k_{mode}", channels=3)
        assert got3.mode == "RGB" and np.array_equal(np.asarray(got3), rgb), mode
        got1 = decode_image(data, "s.tar", f"k_{mode}", channels=1)
        expected1 = rgb[..., 0] if mode in ("L", "LA", "I;16") else _luma(rgb)
        assert got1.mode == "L" and np.array_equal(np.asarray(got1), expected1), mode


def test_exif_orientation_is_ignored_like_timm():
    pixels = np.random.default_rng(1).integers(0, 256, (10, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6                       # "rotate 90° clockwise to display"
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    decoded = np.asarray(decode_image(data, channels=3))
    assert decoded.shape == (10, 30, 3) and np.array_equal(decoded, _raw(data))   # stored order, not rotated


# ---------------------------------------------------------------------------------------------------------------
# Shards written by GNU tar: upper-case extensions, directory prefixes, hard links; pipe: and brace URLs

def tar_shard(folder, name: str, files: dict[str, bytes], links: dict[str, str] | None = None) -> str:
    """``files`` (relative path -> bytes) written to disk and packed by GNU tar, sorted by name; ``links``:
    new name -> existing name, made with ``ln`` so tar stores them as hard-link members."""
    src = os.path.join(str(folder), name + ".src")
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(src, rel)) or src, exist_ok=True)
        with open(os.path.join(src, rel), "wb") as f:
            f.write(data)
    for new, old in (links or {}).items():
        os.link(os.path.join(src, old), os.path.join(src, new))
    out = os.path.join(str(folder), name)
    top = sorted({rel.split("/", 1)[0] for rel in [*files, *(links or {})]})
    subprocess.run([GNU_TAR, "--sort=name", "--format=gnu", "-cf", out, "-C", src, *top], check=True)
    return out


EXTS = {"RGB": "JPG", "L": "jpeg", "CMYK": "JPEG", "RGBA": "PNG", "LA": "png", "P": "Png", "I;16": "PNG"}
MODES = list(EXTS)


def mixed_files(n: int, seed: int, classes: int = 4, prefix: str = "") -> dict[str, bytes]:
    """``<prefix>a/imgNNN`` and ``<prefix>b/imgNNN`` samples (same basenames under two folders), modes cycling
    through MODES."""
    files = {}
    for i in range(n):
        folder, mode = "ab"[i % 2], MODES[i % len(MODES)]
        key = f"{prefix}{folder}/img{i // 2:03d}"
        files[f"{key}.{EXTS[mode]}"] = mode_images(seed * 1000 + i)[mode]
        files[f"{key}.cls"] = str(i % classes).encode()
        files[f"{key}.json"] = json.dumps({"mode": mode}).encode()
    return files


@needs_tar
def test_gnu_tar_shard_is_read_as_webdataset_groups_it(tmp_path):
    files = mixed_files(8, seed=3)
    shard = tar_shard(tmp_path, "s.tar", files)
    samples = list(iter_shard(shard))
    keys = [s["__key__"] for s in samples]
    assert keys == sorted({rel.rsplit(".", 1)[0] for rel in files})     # a/img000 and b/img000 are two keys
    assert "a/img000" in keys and "b/img000" in keys
    # the reference: webdataset's own pipeline over the same file
    import webdataset as wds
    reference = list(wds.WebDataset(shard, shardshuffle=False))
    assert [s["__key__"] for s in reference] == keys
    for ours, theirs in zip(samples, reference):
        assert {k: v for k, v in ours.items() if not k.startswith("__")} == \
               {k: v for k, v in theirs.items() if not k.startswith("__")}
    assert {f for s in samples for f in s if not f.startswith("__")} == {"jpg", "jpeg", "png", "cls", "json"}


@needs_tar
def test_hard_link_member_resolved_from_a_file_refused_from_a_pipe(tmp_path):
    files = {"x/a.png": mode_images(1)["L"], "x/a.cls": b"0", "x/b.cls": b"1"}
    shard = tar_shard(tmp_path, "h.tar", files, links={"x/b.png": "x/a.png"})
    with tarfile.open(shard) as tar:
        assert tar.getmember("x/b.png").islnk()          # GNU tar stored the second name as a hard link
    samples = {s["__key__"]: s for s in iter_shard(shard)}
    assert samples["x/b"]["png"] == samples["x/a"]["png"] == files["x/a.png"]
    with pytest.raises(ShardError, match=r"'x/b.png' in shard pipe:cat .* is a hard link to 'x/a.png'.*"
                                         r"--hard-dereference"):
        list(iter_shard(f"pipe:cat {shard}"))
    # webdataset itself drops the member silently: the sample x/b would have no image
    import webdataset as wds
    assert "png" not in {s["__key__"]: s for s in wds.WebDataset(shard, shardshuffle=False)}["x/b"]


def test_non_adjacent_key_and_symlink_are_named(tmp_path):
    path = str(tmp_path / "bad.tar")
    with tarfile.open(path, "w") as tar:
        for name in ("k1.png", "k2.png", "k1.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
    with pytest.raises(ShardError, match=r"key 'k1' in shard .*bad.tar: its members are not adjacent"):
        list(iter_shard(path))
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k1.png")
        info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.png"
        tar.addfile(info)
    with pytest.raises(ShardError, match=r"'k1.png' .* is a symbolic link"):
        list(iter_shard(path))


@needs_tar
def test_pipe_and_brace_urls_scan_and_read(tmp_path):
    for i in range(2):
        tar_shard(tmp_path, f"p-{i}.tar", mixed_files(4, seed=10 + i, prefix=f"s{i}/"))
    brace = str(tmp_path / "p-{0..1}.tar")
    pipe = f"pipe:cat {tmp_path}/p-{{0..1}}.tar"
    by_path = scan_shards(brace, str(tmp_path / "paths.json"))
    by_pipe = scan_shards(pipe, str(tmp_path / "pipe.json"))
    assert [s.url for s in by_pipe.shards] == [f"pipe:cat {tmp_path}/p-{i}.tar" for i in range(2)]
    assert by_pipe.fingerprint == by_path.fingerprint and by_pipe.channels == 3 and by_pipe.num_samples == 8
    check_shards(Manifest.load(by_pipe.path), sha256=True, count=True)
    # the same shards as file:// URLs and from an fsspec store (memory://, as s3:// goes) give the same dataset
    import fsspec
    for i in range(2):
        with open(tmp_path / f"p-{i}.tar", "rb") as src, fsspec.open(f"memory://wds/p-{i}.tar", "wb") as dst:
            dst.write(src.read())
    by_file = scan_shards(f"file://{tmp_path}/p-{{0..1}}.tar", str(tmp_path / "file.json"))
    by_fsspec = scan_shards("memory://wds/p-{0..1}.tar", str(tmp_path / "memory.json"))
    assert by_file.fingerprint == by_fsspec.fingerprint == by_path.fingerprint
    grey = CliRunner().invoke(main, ["data", "prepare", "scan", brace, "--out", str(tmp_path / "grey.json"),
                                     "--channels", "1"])
    assert grey.exit_code == 0, grey.output
    assert Manifest.load(str(tmp_path / "grey.json")).channels == 1          # chosen: RGB images decode to luma
    assert Manifest.load(str(tmp_path / "grey.json")).fingerprint != by_path.fingerprint
    check_shards(Manifest.load(by_fsspec.path), sha256=True, count=True)
    with pytest.raises(ShardError, match=r"the command of shard pipe:cat .*missing.tar 2>/dev/null failed with exit status 1"):
        list(iter_shard(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null"))
    from shared.reader import ShardStream
    rows = sorted((s.row, s.key) for s in ShardStream(Manifest.load(by_pipe.path), shuffle=False, rank=0, world=1))
    assert [key for _, key in rows] == [f"s{i}/{k}" for i in range(2)
                                        for k in ("a/img000", "a/img001", "b/img000", "b/img001")]


# ---------------------------------------------------------------------------------------------------------------
# Mixed modes through scan, cache build, train and eval (the real CLI)

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 32}
AUG = ["--set", "augment.image_size=16", "--set", "augment.mean=[0.5,0.5,0.5]", "--set", "augment.std=[0.5,0.5,0.5]"]


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@needs_tar
@pytest.mark.slow
def test_mixed_modes_scan_build_train_eval(tmp_path):
    from tests.cache_fixtures import make_teacher
    for i in range(2):
        tar_shard(tmp_path, f"train-{i}.tar", mixed_files(14, seed=i, prefix=f"train/{i}/"))
    tar_shard(tmp_path, "test-0.tar", mixed_files(8, seed=7, prefix="val/"))
    runner = CliRunner()
    _ok(runner.invoke(main, ["data", "prepare", "scan", str(tmp_path / "train-{0..1}.tar"),
                             "--out", str(tmp_path / "train.json"), "--num-classes", "4"]))
    _ok(runner.invoke(main, ["data", "prepare", "scan", str(tmp_path / "test-0.tar"),
                             "--out", str(tmp_path / "test.json"), "--num-classes", "4"]))
    manifest = Manifest.load(str(tmp_path / "train.json"))
    assert manifest.channels == 3 and manifest.num_samples == 28
    assert set(manifest.source["modes"]) == set(MODES)
    teacher = make_teacher(str(tmp_path / "conv.safetensors"), "conv", num_classes=4, in_chans=3,
                           mean=(0.5,) * 3, std=(0.5,) * 3)
    cache = str(tmp_path / "c.zarr")
    _ok(runner.invoke(main, ["cache", "build", "--data", manifest.path, "--teacher", f"conv={teacher}",
                             "--views", "1", "--topk", "2", "--seed", "3", "--out", cache, "--batch-size", "8",
                             "--threads", "1", "--no-progress", *AUG]))
    run = str(tmp_path / "run")
    _ok(runner.invoke(main, ["train", "--data", manifest.path, "--test-data", str(tmp_path / "test.json"),
                             "--cache", cache, "--conv-teacher", "conv", "--epochs", "1", "--batch-size", "8",
                             "--out", run, "--set", "data.view_seed=3", "--set", "data.num_workers=0",
                             "--set", "train.progress=false", *AUG,
                             *[a for k, v in TINY.items() for a in ("--set", f"student.options.{k}={v}")]]))
    out = str(tmp_path / "eval.json")
    _ok(runner.invoke(main, ["eval", "--checkpoint", os.path.join(run, "student.safetensors"),
                             "--data", str(tmp_path / "test.json"), "--workers", "0", "--out", out]))
    with open(out) as f:
        report = json.load(f)
    assert next(iter(report["sets"].values()))["samples"] == 8


# ---------------------------------------------------------------------------------------------------------------
# The train-start shard check and the fingerprint

def _train(manifest_path: str, out: str, *extra: str):
    args = ["train", "--data", manifest_path, "--kd", "none", "--epochs", "1", "--batch-size", "8", "--out", out,
            "--set", "data.num_workers=0", "--set", "train.progress=false", "--set", "augment.image_size=16",
            *[a for k, v in TINY.items() for a in ("--set", f"student.options.{k}={v}")], *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def small(tmp_path):
    return make_shards(str(tmp_path / "d"), num_samples=16, shard_size=8, size=16)


def test_train_start_refuses_missing_truncated_and_changed_shards(small, tmp_path):
    shard = small.shard_url(1)
    original = open(shard, "rb").read()
    assert original[512:513] == b"8"                  # the first member's data: s_000008.cls holds "8"
    cases = {"missing": (None, r"shard .*s-0001.tar listed in manifest .* does not exist"),
             "truncated": (original[:-512], r"shard .*s-0001.tar has \d+ bytes but manifest .* records \d+ "
                                            r"\(truncated"),
             "changed": (original[:512] + b"9" + original[513:],     # same size, another label
                         r"shard .*s-0001.tar does not match manifest .*: sha256")}
    for name, (content, message) in cases.items():
        if os.path.exists(shard):
            os.remove(shard)
        if content is not None:
            with open(shard, "wb") as f:
                f.write(content)
        result = _train(small.path, str(tmp_path / name))
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and re.search(message, lines[0]), (name, result.output)
        assert not os.path.exists(tmp_path / name)         # refused before anything was written
    # --no-verify-shards skips only the sha256: the changed shard (same size) passes the check and trains
    result = _train(small.path, str(tmp_path / "skip"), "--no-verify-shards")
    assert result.exit_code == 0, result.output
    os.remove(shard)
    result = _train(small.path, str(tmp_path / "skip-missing"), "--no-verify-shards")
    assert result.exit_code == 2 and "does not exist" in result.output


def _edit(path: str, change, name: str = "edited") -> str:
    with open(path) as f:
        data = json.load(f)
    change(data)
    edited = path.replace(".json", f"-{name}.json")
    with open(edited, "w") as f:
        json.dump(data, f)
    return edited


def test_fingerprint_covers_counts_skipped_samples_and_channels(small):
    base = Manifest.load(small.path)
    variants = {
        "count": lambda m: setattr(m.shards[1], "samples", m.shards[1].samples - 2),
        "skipped": lambda m: m.skipped.append({"shard": m.shards[0].url, "key": "s_000003", "reason": "bad"}),
        "channels": lambda m: setattr(m, "channels", 3)}
    prints = {}
    for name, change in variants.items():
        m = Manifest.load(small.path)
        change(m)
        prints[name] = Manifest(m.shards, m.num_classes, m.class_names, skipped=m.skipped, channels=m.channels).fingerprint
    assert len({base.fingerprint, prints["count"], prints["skipped"], prints["channels"]}) == 4
    # a reason is informational: editing it keeps the fingerprint
    m = Manifest.load(small.path)
    m.skipped = [{"shard": m.shards[0].url, "key": "s_000003", "reason": "x"}]
    n = Manifest.load(small.path)
    n.skipped = [{"shard": n.shards[0].url, "key": "s_000003", "reason": "y"}]
    assert m.fingerprint == n.fingerprint


def test_hand_edited_manifests_are_caught(small):
    runner = CliRunner()
    lowered_total = _edit(small.path, lambda d: d.update(num_samples=d["num_samples"] - 10), "total")
    lowered_shard = _edit(small.path, lambda d: d["shards"][1].update(samples=3), "shard")
    added_skip = _edit(small.path, lambda d: d["skipped"].append({"shard": d["shards"][0]["url"], "key": "s_000001",
                                                                  "reason": "hand"}), "skip")
    for path in (lowered_total, lowered_shard, added_skip):
        result = runner.invoke(main, ["data", "info", path])
        assert result.exit_code == 2 and "was edited" in result.output, result.output
    # even with a recomputed fingerprint (someone used our code to re-save it), --verify counts the samples

    def recomputed(d):
        d["shards"][1]["samples"] -= 3
        m = Manifest([type(s)(x["url"], x["samples"], x["sha256"], size=x["size"]) for x, s in
                      zip(d["shards"], small.shards)], d["num_classes"], d["class_names"], channels=d["channels"])
        d.update(json.loads(m.to_json()))
    resaved = _edit(small.path, recomputed, "resaved")
    assert runner.invoke(main, ["data", "info", resaved]).exit_code == 0
    result = runner.invoke(main, ["data", "info", resaved, "--verify"])
    assert result.exit_code == 2 and "records 5 samples but it holds 8 samples" in result.output, result.output
    # and the reader refuses the extra samples instead of dropping them silently
    from shared.reader import ShardStream
    with pytest.raises(ShardError, match="has more samples than manifest"):
        list(ShardStream(Manifest.load(resaved), shuffle=False, rank=0, world=1))
    assert runner.invoke(main, ["data", "info", small.path, "--verify"]).exit_code == 0


def test_manifest_without_channels_is_refused_before_anything_runs(small, tmp_path):
    edited = _edit(small.path, lambda d: d.update(format="cit-manifest/1", fingerprint=None, channels=None))
    m = Manifest.load(edited)              # a format-1 manifest without source.channels
    with pytest.raises(ManifestError, match="records no valid channel count"):
        m.require_channels()
    result = _train(edited, str(tmp_path / "run"))
    assert result.exit_code == 2 and "records no valid channel count" in result.output
