"""Stage 1: the logit cache — correctness against the teachers, crash safety, multi-process, S3, verify, refusals."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cache_builder import BuildError, build_cache, cache_info, verify_cache
from cache_builder.assemble import export_cache
from cache_builder.cli import cache as cache_cli
from shared.augment import ViewParams, ViewSpec, apply_view, to_model_input
from shared.cache_schema import STATUS_BUILDING, STATUS_COMPLETE, CacheError, LogitCache
from shared.manifest import Manifest
from shared.views import decode, render_view
from tests.cache_fixtures import (REPO, ForkedCli, assert_bit_identical, count_written, free_port, invoke_cli,
                                  make_teacher, store_arrays)
from tests.shard_fixtures import make_shards

E, K, N, SHARD, BATCH = 3, 5, 200, 50, 16
# 16 px views keep the tiny teachers fast; erasing on half the views so its params are exercised
AUG = {"image_size": 16, "erase_prob": 0.5, "mean": [0.4], "std": [0.3]}
SPEC = ViewSpec.from_dict(AUG)
SETS = [f"--set=augment.{k}={json.dumps(v)}" for k, v in AUG.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teachers):
    root = tmp_path_factory.mktemp("cache")
    data = make_shards(str(root / "train"), num_samples=N, shard_size=SHARD, prefix="tr", seed=1)
    test = make_shards(str(root / "test"), num_samples=40, shard_size=40, prefix="te", seed=2)
    conv, inv = tiny_teachers["conv"], tiny_teachers["inv"]
    w = {"root": root, "data": data.path, "test": test.path, "teachers": [f"conv={conv}", f"inv={inv}"],
         "conv": conv, "inv": inv, "ref": str(root / "ref.zarr")}
    summary = build_cache(w["data"], w["teachers"], w["ref"], views=E, topk=K, spec=SPEC, seed=5,
                          batch_size=BATCH, workers=1, threads=1, test_data=w["test"], progress=False)
    assert summary.complete and summary.units_built == E * (N // SHARD) and summary.views_built == E * N
    return w


def cli_args(w, out: str, *extra: str, views: int = E) -> list[str]:
    args = ["build", "--data", w["data"], "--views", str(views), "--topk", str(K), "--seed", "5", "--out", out,
            "--batch-size", str(BATCH), "--threads", "1", "--test-data", w["test"], "--no-progress", *SETS, *extra]
    for t in w["teachers"]:
        args += ["--teacher", t]
    return args


def test_stored_topk_equal_teachers_on_replayed_views(world):
    from shared.checkpoint import load_checkpoint
    cache = LogitCache.open(world["ref"])
    attrs = cache.attrs
    manifest = Manifest.load(world["data"])
    assert attrs.status == STATUS_COMPLETE and attrs.views == E and attrs.topk == K
    assert attrs.dataset_fingerprint == manifest.fingerprint and attrs.num_samples == N
    assert {t.name: t.kind for t in attrs.teachers} == {"conv": "conv", "inv": "inv"}
    from shared.reader import pieces_for_rows, read_piece
    raws = [s for p in pieces_for_rows(manifest, 0, N) for s in read_piece(manifest, p)]
    for name in ("conv", "inv"):
        model, meta = load_checkpoint(world[name])
        model.eval()
        record = attrs.teacher(name)
        assert record.checkpoint_sha256 and 0.0 <= record.test_accuracy <= 1.0
        for v in range(E):
            rendered = [render_view(SPEC, 5, v, raw) for raw in raws]
            views = torch.stack([r[0] for r in rendered])
            with torch.inference_mode():
                logits = model(to_model_input(views, record.mean, record.std)).float()
            top = torch.topk(logits, K, dim=1)
            got = cache.read_topk(name, v, 0, N)
            assert got.logp.dtype == np.float16 and got.logp.shape == (N, K) and got.tail.shape == (N, 1)
            log_p = torch.log_softmax(logits.double(), 1)
            np.testing.assert_allclose(got.logp.astype(np.float32), log_p.gather(1, top.indices).numpy(),
                                       rtol=1e-3, atol=1e-3)
            assert (np.diff(got.logp.astype(np.float32), axis=1) <= 0).all()
            tail = 1 - log_p.exp().gather(1, top.indices).sum(1).numpy()
            np.testing.assert_allclose(np.exp(got.tail[:, 0].astype(np.float64)), tail, rtol=1e-3, atol=2e-4)
            gap = (top.values[:, :-1] - top.values[:, 1:]).min(dim=1).values.numpy()
            clear = gap > 1e-3                   # rows without near-ties: class order is unambiguous
            assert clear.mean() > 0.5
            np.testing.assert_array_equal(got.indices[clear], top.indices.numpy()[clear])
            # params decode to exactly the view apply_view makes
            stored = cache.read_params(v, 0, N)
            np.testing.assert_array_equal(stored, np.stack([r[1] for r in rendered]))
            for i in (0, 17, N - 1):
                params = ViewParams.decode(stored[i], SPEC)
                assert torch.equal(apply_view(SPEC, decode(raws[i]), params), rendered[i][0])


def test_info_and_verify_on_a_good_cache(world):
    info = cache_info(world["ref"])
    assert info["complete"] and info["views"] == E and info["topk"] == K and info["num_samples"] == N
    assert [t["name"] for t in info["teachers"]] == ["conv", "inv"]
    assert all(t["test_accuracy"] is not None for t in info["teachers"])
    assert 0 < info["bytes_per_view_per_teacher"] < 200
    report = verify_cache(world["ref"], data=world["data"], recompute=12)
    assert report.ok, report.text()
    assert report.recomputed == 12
    runner = CliRunner()
    out = runner.invoke(cache_cli, ["info", world["ref"]])
    assert out.exit_code == 0, out.output
    assert "complete" in out.output and "B per view per teacher" in out.output and "conv" in out.output
    out = runner.invoke(cache_cli, ["verify", world["ref"], "--data", world["data"], "--recompute", "4"])
    assert out.exit_code == 0, out.output
    # plain zarr, no cit code: the layout documented in the README
    g = zarr.open_group(world["ref"], mode="r")
    assert g.attrs["status"] == "complete" and g["conv/logp"].shape == (E, N, K) and g.attrs["format"] == 2
    assert g["conv/logp"].dtype == np.float16 and g["inv/tail"].shape == (E, N, 1)


def test_rerun_of_a_complete_build_does_nothing(world):
    before = store_arrays(world["ref"])
    # no threads given: a resume uses the thread count pinned in the cache (1), whatever this process has
    summary = build_cache(world["data"], world["teachers"], world["ref"], views=E, topk=K, spec=SPEC, seed=5,
                          batch_size=BATCH, workers=0, test_data=world["test"], progress=False)
    assert summary.complete and summary.units_built == 0 and summary.units_skipped == E * (N // SHARD)
    after = store_arrays(world["ref"])
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_kill_9_and_resume_is_bit_identical(world, tmp_path):
    views = 1
    small = ["--chunk-rows", "10", "--batch-size", "4"]   # 20 small units
    ref = str(tmp_path / "clean.zarr")
    build_cache(world["data"], world["teachers"], ref, views=views, topk=K, spec=SPEC, seed=5, batch_size=4,
                chunk_rows=10, workers=0, threads=1, progress=False)
    out = str(tmp_path / "killed.zarr")
    args = [a for a in cli_args(world, out, *small, "--workers", "1", views=views)
            if a not in ("--test-data", world["test"])]
    rng = random.Random(int(time.time()))
    done_dir = os.path.join(out, "done", "c")
    kills = []
    for attempt in range(2):
        proc = ForkedCli(cache_cli, args, str(tmp_path))
        if attempt == 0:     # early: while the store is being created or the first units are written
            proc.run_until(lambda: os.path.exists(out), "the build")
            time.sleep(rng.uniform(0.0, 0.3))
        else:                # after a random number of units, at a random point inside the next one
            target = count_written(done_dir) + rng.randint(1, 8)
            proc.run_until(lambda: count_written(done_dir) >= target, "the build")
            time.sleep(rng.uniform(0.0, 0.05))
        assert proc.poll() is None, f"the build finished before it could be killed: {proc.communicate()}"
        proc.kill9()
        kills.append(count_written(done_dir))
    assert not _is_complete(out) and kills[-1] < views * N // 10, kills
    result = invoke_cli(*args)                    # the resume is not killed: in this process
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and f"{kills[-1]} units were already done" in result.stdout
    assert_bit_identical(ref, out)
    assert LogitCache.open(out).attrs.teachers == LogitCache.open(ref).attrs.teachers


def _is_complete(url: str) -> bool:
    try:
        return zarr.open_group(url, mode="r").attrs.get("status") == STATUS_COMPLETE
    except Exception:  # noqa: BLE001 — nothing written yet
        return False


@pytest.fixture(scope="module")
def view0(world, tmp_path_factory) -> str:
    """View 0 of the reference build (an export: equal to a fresh one-view build)."""
    return export_cache(world["ref"], str(tmp_path_factory.mktemp("view0") / "view0.zarr"), views=1).url


def test_torchrun_two_processes_equal_one(world, view0, tmp_path):
    out = str(tmp_path / "ddp.zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
           str(free_port()), "-m", "cache_builder.cli",
           *cli_args(world, out, "--workers", "1", views=1)]      # 4 units for 2 ranks
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("complete") == 1          # one summary line (rank 0)
    assert_bit_identical(view0, out)


def test_s3_round_trip(world, view0, monkeypatch):
    pytest.importorskip("s3fs")
    from tests.cache_fixtures import start_moto
    server, port = start_moto()
    try:
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("cit-test")
        fs.put(os.path.dirname(world["data"]) + "/", "cit-test/train/", recursive=True)
        # shards and cache both on S3; the endpoint comes from the environment for the shards, and from an
        # explicit storage option for the cache.  One view (S3 requests are slow): the local build's view 0
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
        url = "s3://cit-test/caches/c.zarr"
        summary = build_cache("s3://cit-test/train/tr.json", world["teachers"], url, views=1, topk=K, spec=SPEC,
                              seed=5, batch_size=BATCH, workers=1, threads=1, test_data=world["test"],
                              progress=False,
                              storage_options=options)
        assert summary.complete and summary.units_built == N // SHARD
        assert_bit_identical(view0, url, options)
        cache = LogitCache.open(url, storage_options=options)
        ref = LogitCache.open(world["ref"])
        np.testing.assert_array_equal(cache.read_topk("inv", 0, 10, 60).logp, ref.read_topk("inv", 0, 10, 60).logp)
        assert [t.test_accuracy for t in cache.attrs.teachers] == [t.test_accuracy for t in ref.attrs.teachers]
        info = cache_info(url, options)
        assert info["complete"] and info["size_bytes"] > 0
        report = verify_cache(url, data="s3://cit-test/train/tr.json", recompute=3, storage_options=options)
        assert report.ok, report.text()
    finally:
        server.stop()


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_recompute_and_fidelity_name_a_checkpoint_that_is_not_the_recorded_one(world):
    """Another checkpoint than the one the cache recorded (sha256) is named, never compared as if it were."""
    report = verify_cache(world["ref"], data=world["data"], recompute=2, teachers=[f"conv={world['inv']}"])
    assert not report.ok and any("teacher conv: checkpoint" in p and "is not the one the cache was built with" in p
                                 for p in report.problems), report.text()
    out = CliRunner().invoke(cache_cli, ["info", world["ref"], "--fidelity", "--sample", "4", "--data", world["data"],
                                         "--teacher", f"conv={world['inv']}", "--device", "cpu"])
    assert out.exit_code == 2 and "is not the one the cache was built with" in out.output, out.output
    assert out.output.strip().count("\n") == 0


def test_verify_catches_tampering_other_shards_and_incomplete(world, tmp_path):
    # 1) a chunk whose classes were moved to other rows (still sorted, finite, in range, masses adding up to 1):
    # only the recompute sees it
    tampered = _copy(world["ref"], str(tmp_path / "tampered.zarr"))
    g = zarr.open_group(tampered, mode="r+")
    g["conv/indices"][1, 0:SHARD] = np.roll(g["conv/indices"][1, 0:SHARD], 1, axis=0)
    report = verify_cache(tampered, data=world["data"])
    assert report.ok, report.text()      # structurally fine ...
    report = verify_cache(tampered, data=world["data"], recompute=N * E)
    assert not report.ok and any("recompute" in p and "conv" in p for p in report.problems), report.text()
    # 2) bytes of a chunk flipped on disk: the chunk's crc32c fails
    corrupt = _copy(world["ref"], str(tmp_path / "corrupt.zarr"))
    chunk = os.path.join(corrupt, "inv", "indices", "c", "2", "1", "0")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    report = verify_cache(corrupt)
    assert any(p.startswith("unreadable") and "inv" in p for p in report.problems), report.text()
    # 2b) unsorted values are caught without a recompute
    unsorted = _copy(world["ref"], str(tmp_path / "unsorted.zarr"))
    g = zarr.open_group(unsorted, mode="r+")
    g["inv/logp"][0, 0:SHARD] = g["inv/logp"][0, 0:SHARD][:, ::-1]
    assert any(p.startswith("sorted") for p in verify_cache(unsorted).problems)
    # 2c) log-probabilities that no longer add up to 1 with the tail mass are caught without a recompute
    shifted = _copy(world["ref"], str(tmp_path / "shifted.zarr"))
    g = zarr.open_group(shifted, mode="r+")
    g["conv/logp"][1, 0:SHARD] = (g["conv/logp"][1, 0:SHARD].astype(np.float32) + 0.05).astype(np.float16)
    assert any(p.startswith("mass") and "conv" in p for p in verify_cache(shifted).problems)
    # 3) a cache built from other shards: fingerprint
    other = make_shards(str(tmp_path / "other"), num_samples=N, shard_size=SHARD, prefix="tr", seed=9)
    report = verify_cache(world["ref"], data=other.path)
    assert any(p.startswith("fingerprint") for p in report.problems), report.text()
    result = CliRunner().invoke(cache_cli, ["verify", world["ref"], "--data", other.path])
    assert result.exit_code == 1 and "fingerprint" in result.output
    # 4) incomplete: a unit not written; readers refuse unless asked
    incomplete = _copy(world["ref"], str(tmp_path / "incomplete.zarr"))
    os.remove(os.path.join(incomplete, "done", "c", "1", "2"))
    g = zarr.open_group(incomplete, mode="r+")
    g.attrs["status"] = STATUS_BUILDING
    report = verify_cache(incomplete, data=world["data"])
    assert any(p.startswith("complete") and f"{E * N // SHARD - 1} of {E * N // SHARD}" in p
               for p in report.problems), report.text()
    with pytest.raises(CacheError, match="incomplete"):
        LogitCache.open(incomplete)
    assert LogitCache.open(incomplete, allow_incomplete=True).done_map().sum() == E * N // SHARD - 1
    assert not cache_info(incomplete)["complete"]


def _refused(w, out: str, match: str, **kw):
    options = dict(views=E, topk=K, spec=SPEC, seed=5, batch_size=BATCH, workers=0, threads=1, progress=False)
    options.update(kw)
    teachers = options.pop("teachers", w["teachers"])
    data = options.pop("data", w["data"])
    existed = os.path.exists(out)
    before = store_arrays(out) if existed else None
    with pytest.raises(BuildError, match=match):
        build_cache(data, teachers, out, **options)
    if existed:        # untouched
        after = store_arrays(out)
        assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)
    else:              # nothing written at all
        assert not os.path.exists(out)


def test_bad_inputs_refused_before_any_work(world, tmp_path):
    root = tmp_path
    out = str(root / "never.zarr")
    # a teacher whose classes differ from the manifest
    five = make_teacher(str(root / "five.safetensors"), "conv", num_classes=5)
    _refused(world, out, "five", teachers=[f"five={five}"])
    # K larger than the class count
    _refused(world, out, "topk 11 is larger than the number of classes", topk=11)
    # an output that already holds a different cache: no silent overwrite ...
    _refused(world, world["ref"], "already holds a different cache", views=E + 1)
    _refused(world, world["ref"], "cpu_threads", threads=2)         # other CPU rounding: not the same cache
    _refused(world, world["ref"], "batch_size", batch_size=BATCH + 1)
    # ... unless --force
    forced = _copy(world["ref"], str(root / "forced.zarr"))
    summary = build_cache(world["data"], world["teachers"][:1], forced, views=1, topk=2, spec=SPEC, seed=5,
                          batch_size=BATCH, workers=0, threads=1, progress=False, force=True)
    assert summary.complete and LogitCache.open(forced).attrs.views == 1
    assert LogitCache.open(forced).teacher_names == ["conv"]
    # something that is not a cit cache is never touched, even with --force
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not a cit cache"):
        build_cache(world["data"], world["teachers"], str(foreign), views=E, topk=K, spec=SPEC, workers=0,
                    threads=1, progress=False, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    # unreadable shards: one missing, one changed after the manifest was made
    broken = make_shards(str(root / "broken"), num_samples=60, shard_size=20, prefix="br")
    os.remove(broken.shard_url(1))
    _refused(world, out, "does not exist", data=broken.path)
    changed = make_shards(str(root / "changed"), num_samples=60, shard_size=20, prefix="ch")
    with open(changed.shard_url(2), "ab") as f:
        f.write(b"\0" * 512)
    size = os.path.getsize(changed.shard_url(2)) - 512
    _refused(world, out, f"has {size + 512} bytes but manifest .* records {size}", data=changed.path)
    with open(changed.shard_url(2), "r+b") as f:     # same size, other bytes
        f.truncate(size)
        f.seek(size - 2000)
        f.write(b"\1")
    _refused(world, out, "sha256", data=changed.path)
    # a teacher producing NaN: named, with the sample key
    nan = make_teacher(str(root / "nan.safetensors"), "conv", nan=True)
    _refused(world, out, r"teacher bad produced non-finite .* sample 'tr_000000'",
             teachers=[world["teachers"][0], f"bad={nan}"])
    # a teacher below --min-teacher-acc on the test set (random teachers are ~10% accurate)
    _refused(world, out, "below --min-teacher-acc", test_data=world["test"], min_teacher_acc=0.9)
    # bad names / arguments
    _refused(world, out, "not allowed", teachers=[f"done={world['conv']}"])
    _refused(world, out, "NAME=CHECKPOINT", teachers=[world["conv"]])


def test_cli_errors_are_clear(world, tmp_path):
    out = str(tmp_path / "x.zarr")
    result = CliRunner().invoke(cache_cli, cli_args(world, out, "--topk", "50"))
    assert result.exit_code == 2 and "larger than the number of classes" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not os.path.exists(out)
    result = CliRunner().invoke(cache_cli, cli_args(world, out, "--set", "train.lr=1"))
    assert result.exit_code != 0 and "augment" in result.output


def test_device_normalisation_is_to_model_input_bit_for_bit(world):
    from cache_builder.teachers import TeacherRunner, load_teachers
    teachers = load_teachers([("conv", world["conv"])], 10, torch.device("cpu"))
    runner = TeacherRunner(teachers, torch.device("cpu"), "fp32", K)
    views = torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8)
    record = teachers[0].record
    assert torch.equal(runner.normalise(teachers[0], views), to_model_input(views, record.mean, record.std))


def test_exact_mixing_caches_the_mixed_view(world, tmp_path):
    """augment.mix = exact: the teacher sees the mixed image stage 2 rebuilds (shared.views.render_mixed)."""
    from shared.checkpoint import load_checkpoint
    from shared.mixing import MixParams, rows_with_partners
    from shared.reader import pieces_for_rows, read_piece
    from shared.views import render_mixed
    spec = ViewSpec.from_dict({**AUG, "mix": "exact", "mix_window": 8})
    out = str(tmp_path / "mixed.zarr")
    summary = build_cache(world["data"], world["teachers"], out, views=2, topk=K, spec=spec, seed=5,
                          batch_size=BATCH, workers=1, threads=1, progress=False)
    assert summary.complete
    cache = LogitCache.open(out)
    manifest = Manifest.load(world["data"])
    lo, hi = 60, 100
    first, last = rows_with_partners(manifest, lo, hi, spec.mix_window)
    samples = [s for p in pieces_for_rows(manifest, first, last) for s in read_piece(manifest, p)]
    model, meta = load_checkpoint(world["inv"])
    for v in range(2):
        rendered = render_mixed(spec, 5, v, manifest, samples, range(lo, hi))
        views = torch.stack([rendered[r][0] for r in range(lo, hi)])
        params = cache.read_params(v, lo, hi)
        assert params.shape == (hi - lo, spec.num_params)
        np.testing.assert_array_equal(params, np.stack([rendered[r][1] for r in range(lo, hi)]))
        kinds = [MixParams.decode(p[-MixParams.SIZE:]).kind for p in params]
        assert any(kinds)                                     # some rows really are mixed
        with torch.inference_mode():
            logits = model.eval()(to_model_input(views, meta.mean, meta.std)).float()
        top = logits.topk(K, dim=1)
        np.testing.assert_allclose(cache.read_topk("inv", v, lo, hi).logp.astype(np.float32),
                                   (top.values - torch.logsumexp(logits, 1, keepdim=True)).numpy(),
                                   rtol=1e-3, atol=1e-3)
    report = verify_cache(out, data=world["data"], recompute=10)
    assert report.ok, report.text()
    # mix settings that do not change the cached views are not part of the cache's identity
    approx = build_cache(world["data"], world["teachers"], world["ref"], views=E, topk=K,
                         spec=ViewSpec.from_dict({**AUG, "mix": "approx"}), seed=5, batch_size=BATCH, workers=0,
                         threads=1, test_data=world["test"], progress=False)
    assert approx.complete and approx.units_built == 0


def test_nan_during_the_build_names_teacher_and_key_and_leaves_the_unit_undone(world, tmp_path, monkeypatch):
    from cache_builder.teachers import TeacherRunner
    original = TeacherRunner.packed_topk
    calls = {"n": 0}

    def poisoned(self, views):
        out = original(self, views)
        calls["n"] += 1
        if calls["n"] == 5:        # chunk 0, rows 16..31 (second batch), view 1 (order: batch, then view)
            out[3, 0, 2 * K] = float("nan")     # teacher 0 (conv), row 19: its lse
        return out

    monkeypatch.setattr(TeacherRunner, "packed_topk", poisoned)
    out = str(tmp_path / "nan.zarr")
    with pytest.raises(BuildError, match=r"teacher conv produced non-finite .* sample 'tr_000019' \(view 1, chunk 0"):
        build_cache(world["data"], world["teachers"], out, views=E, topk=K, spec=SPEC, seed=5, batch_size=BATCH,
                    workers=0, threads=1, test_data=world["test"], progress=False)
    cache = LogitCache.open(out, allow_incomplete=True)
    assert cache.attrs.status == STATUS_BUILDING and cache.done_map()[1, 0] == 0
    monkeypatch.setattr(TeacherRunner, "packed_topk", original)
    summary = build_cache(world["data"], world["teachers"], out, views=E, topk=K, spec=SPEC, seed=5,
                          batch_size=BATCH, workers=0, threads=1, test_data=world["test"], progress=False)
    assert summary.complete and summary.units_skipped >= 1
    assert_bit_identical(world["ref"], out)


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_other_fsspec_urls(world, tmp_path, scheme):
    url = f"file://{tmp_path}/c.zarr" if scheme == "file" else f"memory://cit-test-{os.getpid()}/c.zarr"
    summary = build_cache(world["data"], world["teachers"][:1], url, views=1, topk=2, spec=SPEC, seed=5,
                          batch_size=BATCH, workers=1, threads=1, progress=False)
    assert summary.complete
    np.testing.assert_array_equal(LogitCache.open(url).read_topk("conv", 0, 0, N).logp,
                                  LogitCache.open(world["ref"]).read_topk("conv", 0, 0, N).logp[:, :2])
    assert cache_info(url)["complete"] and verify_cache(url, data=world["data"]).ok
