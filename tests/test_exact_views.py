"""Views are pixel-exact across machines: golden digests, every CPU vector path, IEEE-only math, the params field
table, and the per-view pixel digest a cache stores and the trainer checks."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import io

import numpy as np
import pytest

from shared import exact_math
from shared.augment import PARAMS_FIELDS, ViewSpec, decode_record, encode_record, record_size
from shared.mixing import MixParams
from shared.views import VIEW_CODE
from tests.cache_fixtures import REPO, invoke_cli, make_teacher
from tests.golden_views import GOLDEN_PATH, render_golden
from tests.shard_fixtures import make_shards


def _capabilities() -> list[str]:
    caps = ["default", "avx2"]
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx512f" in flags and "avx512bw" in flags:
        caps.append("avx512")
    return caps


def test_golden_views_match_the_committed_file():
    with open(GOLDEN_PATH) as f:
        golden = json.load(f)
    assert golden["view_code"] == VIEW_CODE, "view code changed: regenerate with python -m tests.golden_views --write"
    rows = [r for rs in golden["views"].values() for r in rs]
    assert len(rows) >= 40 and {r["mix_kind"] for r in rows} >= {1, 2} and sum(r["erase"] for r in rows) >= 10
    assert len({op for r in rows for op in r["ops"] if op >= 0}) == 15        # every RandAugment op is in it
    assert render_golden() == golden["views"]


@pytest.mark.parametrize("capability", _capabilities())
def test_golden_views_identical_under_every_cpu_capability(capability):
    env = dict(os.environ, PYTHONPATH=REPO, ATEN_CPU_CAPABILITY=capability,
               OMP_NUM_THREADS="1" if capability == "default" else "2")
    out = subprocess.run([sys.executable, "-c", "import json, torch; from tests.golden_views import render_golden; "
                          "print(torch.backends.cpu.get_cpu_capability()); print(json.dumps(render_golden()))"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True)
    reported, views = out.stdout.strip().splitlines()[-2:]
    assert reported.lower() == capability.lower()          # the env var took effect
    with open(GOLDEN_PATH) as f:
        assert json.loads(views) == json.load(f)["views"]


# ---------------------------------------------------------------------------------------------------------------
# IEEE-only math against the C library / an independent CDF

def test_exact_math_agrees_with_libm():
    rng = np.random.default_rng(0)
    for x in rng.uniform(1e-4, 50, 2000):
        assert math.isclose(exact_math.log(x), math.log(x), rel_tol=4e-16, abs_tol=4e-16)
    for x in rng.uniform(-3, 3, 2000):
        assert math.isclose(exact_math.exp(x), math.exp(x), rel_tol=6e-16)
        s, c = exact_math.sin_cos(x)
        assert abs(s - math.sin(x)) < 3e-15 and abs(c - math.cos(x)) < 3e-15


def test_erasing_noise_is_the_quantised_gaussian():
    mean, std = 0.485, 0.229
    thresholds = exact_math.noise_thresholds(mean, std)
    dist = statistics.NormalDist()
    expected = [dist.cdf(((k + 0.5) / 255 - mean) / std) for k in range(255)]
    assert np.all(np.diff(thresholds.astype(np.int64)) >= 0)
    assert np.max(np.abs(thresholds / 2.0 ** 32 - expected)) < 1e-9
    bits = exact_math.uniform_bits(123, 400_000)
    pixels = exact_math.quantised_normal(bits, mean, std)
    assert np.array_equal(pixels, np.searchsorted(thresholds, bits.astype(np.uint64), side="right"))   # LUT = table
    ref = np.clip(np.rint((mean + std * np.random.default_rng(1).standard_normal(400_000)) * 255), 0, 255)
    assert abs(pixels.mean() - ref.mean()) < 0.5 and abs(pixels.std() - ref.std()) < 0.5


def test_beta_draws_have_the_beta_moments():
    rng = np.random.Generator(np.random.Philox(7))
    for a in (0.8, 1.0):
        x = np.array([exact_math.beta(rng, a, a) for _ in range(20_000)])
        assert abs(x.mean() - 0.5) < 0.01 and abs(x.var() - 0.25 / (2 * a + 1)) < 0.005


# ---------------------------------------------------------------------------------------------------------------
# The params field table

def test_field_table_drives_length_encode_and_decode():
    for spec in (ViewSpec(), ViewSpec(ra_num_ops=3, mix="exact"), ViewSpec(ra_num_ops=0)):
        widths = sum(f.width * (getattr(spec, f.repeat) if f.repeat else 1) for f in PARAMS_FIELDS
                     if f.part == "view" or spec.mixes_views)
        assert spec.num_params == record_size(spec) == widths
    assert MixParams.SIZE == sum(f.width for f in PARAMS_FIELDS if f.part == "mix")
    spec = ViewSpec(ra_num_ops=1, mix="exact")
    values = {"crop": [0.5, 0.1, 0.2, 0.3], "flip": 1, "op": [3, -4.5], "erase_on": 0, "erase": [0] * 4,
              "noise_seed": 77, "mix_kind": 2, "mix_partner": 9, "mix_lam": 0.25, "mix_box": [1, 2, 3, 4]}
    record = encode_record(spec, values)
    assert record.shape == (spec.num_params,) and record[-MixParams.SIZE:].tolist() == [2, 9, 0.25, 1, 2, 3, 4]
    decoded = decode_record(spec, record)
    assert decoded["op"] == [3.0, -4.5] and decoded["noise_seed"] == [77.0]
    with pytest.raises(ValueError, match="do not match the layout"):
        encode_record(spec, {k: v for k, v in values.items() if k != "flip"})


# ---------------------------------------------------------------------------------------------------------------
# Cache across capabilities; an edited shard is refused by `cit train` and found by `cit cache verify --pixels`

AUG = ["--set", "augment.erase_prob=0.6", "--set", "augment.ra_prob=0.9", "--set", "augment.mean=[0.4]",
       "--set", "augment.std=[0.3]"]


def _here() -> str:
    """This process's CPU capability (the suite's own, unless ATEN_CPU_CAPABILITY was set when it started)."""
    import torch
    return torch.backends.cpu.get_cpu_capability()


def _other_capability() -> str:
    """A capability other than this process's, for a training that is not where the cache was built."""
    return "avx2" if _here() == "DEFAULT" else "default"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache built in this process (under its capability, ``_here``), to be trained under another one."""
    root = tmp_path_factory.mktemp("exact")
    make_shards(str(root / "data"), num_samples=24, shard_size=12, seed=3, prefix="ex")
    teacher = make_teacher(str(root / "conv.pt"), "conv", seed=1, mean=(0.4,), std=(0.3,))
    cache = str(root / "c.zarr")
    result = invoke_cli("build", "--data", str(root / "data/ex.json"), "--teacher", f"conv={teacher}", "--views",
                        "2", "--topk", "3", "--seed", "4", "--out", cache, "--batch-size", "8", "--threads", "1",
                        "--no-progress", *AUG)
    assert result.returncode == 0, result.stderr
    return {"root": root, "data": str(root / "data/ex.json"), "cache": cache}


def _train_args(built, out: str, *extra: str) -> list[str]:
    args = [*extra, "--data", built["data"], "--cache", built["cache"], "--conv-teacher", "conv", "--epochs", "1",
            "--batch-size", "8", "--out", out, "--set", "data.view_seed=4", "--set", "data.num_workers=0",
            "--set", "train.progress=false", *AUG]
    for k, v in {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 32}.items():
        args += ["--set", f"student.options.{k}={v}"]
    return args


def _train(built, out: str, capability: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "shared.cli", "train", *_train_args(built, out, *extra)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)


def test_cache_records_digests_and_provenance(built):
    import zarr
    root = zarr.open_group(built["cache"], mode="r")
    digests = np.asarray(root["digest"][:])
    assert digests.shape == (2, 24) and digests.dtype == np.uint32 and len(np.unique(digests)) == 48
    prov = dict(root.attrs)["provenance"]
    assert prov["cpu_capability"] == _here() and set(prov["libraries"]) >= {"pillow", "numpy", "torch", "zarr"}
    assert dict(root.attrs)["view_code"] == VIEW_CODE
    info = invoke_cli("info", built["cache"])
    assert info.returncode == 0 and f"cpu {_here()}" in info.stdout and "pixel digests" in info.stdout
    assert f"pillow {prov['libraries']['pillow']}" in info.stdout


def test_cache_built_under_one_capability_trains_under_another(built, tmp_path):
    other = _other_capability()
    result = _train(built, str(tmp_path / "run"), other)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("was built in another environment") == 1
    assert f"cpu_capability {_here()} -> {other.upper()}" in result.stderr


def test_edited_shard_is_refused_by_train_and_found_by_verify(built, tmp_path):
    # a copy of the data whose second shard has the same keys but one sample's pixels changed
    import shutil
    from shared.shards import encode_png
    data = tmp_path / "data"
    shutil.copytree(built["root"] / "data", data)
    shard = data / "ex-0001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".")[0]                 # first sample of shard 1
    rng = np.random.default_rng(99)
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name == f"{victim}.png":
                payload = encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8))
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    edited = dict(built, data=str(data / "ex.json"))
    from click.testing import CliRunner                                # refused before any work: in this process
    from shared.cli import main as cit
    result = CliRunner().invoke(cit, ["train", *_train_args(edited, str(tmp_path / "run0"))])
    assert result.exit_code == 2 and "ex-0001.tar does not match manifest" in result.stderr, result.output[-2000:]
    result = CliRunner().invoke(cit, ["train", *_train_args(edited, str(tmp_path / "run"), "--no-verify-shards")])
    assert result.exit_code == 2, result.output[-2000:]        # ... else the pixel digest: a user error, mid-run
    assert f"sample {victim!r}" in result.stderr and "pixels check failed" in result.stderr
    assert "ex-0001.tar" in result.stderr and "Traceback" not in result.stderr
    assert isinstance(result.exception, SystemExit)            # handled by the CLI, not an escaped exception
    verify = invoke_cli("verify", built["cache"], "--data", edited["data"], "--pixels")
    assert verify.returncode == 1
    lines = [line for line in verify.stdout.splitlines() if "pixels check failed" in line]
    assert len(lines) == 2 and all(victim in line for line in lines)        # both views of the one edited sample
    clean = invoke_cli("verify", built["cache"], "--data", built["data"], "--pixels", "--sample", "10")
    assert clean.returncode == 0 and "pixels: 10 random views re-rendered" in clean.stdout, clean.stdout


def test_cache_of_other_view_code_is_refused(built):
    from shared.cache_schema import CacheError, LogitCache
    from shared.manifest import Manifest
    from trainer.data import check_cache
    attrs = LogitCache.open(built["cache"]).attrs
    spec, manifest = ViewSpec.from_dict(attrs.augment), Manifest.load(built["data"])
    check_cache(attrs, manifest, spec, attrs.seed, ["conv"], 10, built["cache"])          # as built: accepted
    older = LogitCache.open(built["cache"]).attrs
    older.view_code = {**older.view_code, "params_layout": 1}
    assert older.identity_diff(attrs) and not any("provenance" in d for d in older.identity_diff(attrs))
    with pytest.raises(CacheError, match="rendered by view code .*params_layout': 1.*rebuild the cache"):
        check_cache(older, manifest, spec, older.seed, ["conv"], 10, built["cache"])
