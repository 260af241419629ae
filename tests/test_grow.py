"""Growing a cache: extend views, add teachers, merge (teachers and view ranges) and export give, array by array, what
a fresh build of the final cache gives, locally and on s3; kill -9 during a change, a merge or an export and a rerun
give the same; reader processes see only the documented states (old or new complete cache, or the refusals) and
correct values while a cache changes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from click.testing import CliRunner

from cache_builder import BuildError, build_cache
from cache_builder.cli import cache as cache_cli
from cache_builder.assemble import export_cache, merge_caches
from cache_builder.grow import GrowSettings, add_teachers, extend_cache
from shared.augment import ViewSpec
from shared.cache_schema import CacheError, LogitCache
from tests.cache_fixtures import REPO, ForkedCli, assert_bit_identical, count_written
from tests.shard_fixtures import make_shards

K, N, SHARD, BATCH = 3, 60, 20, 8
AUG = {"image_size": 16, "erase_prob": 0.5, "mean": [0.4], "std": [0.3]}
SPEC = ViewSpec.from_dict(AUG)


@pytest.fixture(scope="module")
def grow_world(tmp_path_factory, tiny_teachers):
    root = tmp_path_factory.mktemp("grow")
    data = make_shards(str(root / "train"), num_samples=N, shard_size=SHARD, prefix="gr", seed=3)
    return {"root": root, "data": data.path, "conv": tiny_teachers["conv"], "inv": tiny_teachers["inv"], "built": {}}


def fresh(w, out: str, views: int, names: tuple[str, ...], **options) -> str:
    build_cache(w["data"], [f"{n}={w[n]}" for n in names], out, views=views,
                **{**dict(topk=K, spec=SPEC, seed=5, batch_size=BATCH, workers=0, threads=1, progress=False),
                   **options})
    return out


def reference(w, views: int, names: tuple[str, ...], fine: bool = False) -> str:
    """A fresh build of ``views`` x ``names`` (``fine``: 5-row chunks, see ``FINE``), made once per module and
    shared: read it, never change it (``copy_of`` for a cache a test grows)."""
    key = (views, names, fine)
    if key not in w["built"]:
        out = str(w["root"] / f"ref-{views}-{'+'.join(names)}{'-fine' if fine else ''}.zarr")
        w["built"][key] = fresh(w, out, views, names, **(FINE if fine else {}))
    return w["built"][key]


def copy_of(w, views: int, names: tuple[str, ...], out: str, fine: bool = False) -> str:
    """A private copy of ``reference`` (file times kept) for a test that changes it."""
    return shutil.copytree(reference(w, views, names, fine), out)


def settings(w, **kw) -> GrowSettings:
    return GrowSettings(data=w["data"], workers=0, progress=False, **kw)


def public_attrs(url: str) -> dict:
    """Every group attribute but the informational ones (provenance: library versions of the building process)."""
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    attrs.pop("provenance")
    return attrs


def assert_same_cache(a: str, b: str) -> None:
    assert_bit_identical(a, b)
    assert public_attrs(a) == public_attrs(b)


def test_extend_2_to_4_equals_a_fresh_4_view_build(grow_world, tmp_path):
    w = grow_world
    grown = copy_of(w, 2, ("conv",), str(tmp_path / "grown.zarr"))
    old = {p: zarr.open_group(grown, mode="r")[p][:2] for p in ("params", "conv/logp", "conv/tail")}
    chunk_files = {f: os.path.getmtime(f) for f in _files(os.path.join(grown, "conv", "logp", "c"))}
    reader = LogitCache.open(grown)             # a training that opened the cache before the change
    seen = reader.read_topk("conv", 1, 0, N)
    summary = extend_cache(grown, 4, settings(w))
    assert summary.complete and summary.units_built == 2 * (N // SHARD) and summary.units_skipped == 2 * (N // SHARD)
    assert_same_cache(reference(w, 4, ("conv",)), grown)
    g = zarr.open_group(grown, mode="r")
    assert all(np.array_equal(g[p][:2], v, equal_nan=True) for p, v in old.items())
    assert all(os.path.getmtime(f) == t for f, t in chunk_files.items())     # old chunks never rewritten
    assert reader.attrs.views == 2 and np.array_equal(reader.read_topk("conv", 1, 0, N).logp, seen.logp)
    assert extend_cache(grown, 4, settings(w)).units_built == 0             # rerun: nothing to do


def test_add_teacher_equals_a_fresh_two_teacher_build(grow_world, tmp_path):
    w = grow_world
    grown = copy_of(w, 2, ("conv",), str(tmp_path / "grown.zarr"))
    before = {f: os.path.getmtime(f) for f in _files(os.path.join(grown, "conv"))}
    summary = add_teachers(grown, [f"inv={w['inv']}"], settings(w))
    assert summary.complete and summary.units_built == 2 * (N // SHARD)
    assert_same_cache(reference(w, 2, ("conv", "inv")), grown)
    assert all(os.path.getmtime(f) == t for f, t in before.items())
    assert LogitCache.open(grown).teacher_names == ["conv", "inv"]


def test_add_teacher_measures_the_new_teachers_accuracy_like_a_build(grow_world, tmp_path):
    """``add-teacher --test-data``: the new teacher's accuracy and its test set recorded as a fresh build with both
    teachers records them; a test set of another channel count is refused before any work."""
    w = grow_world
    test = make_shards(str(tmp_path / "test"), num_samples=24, shard_size=12, prefix="te", seed=9)
    rgb = make_shards(str(tmp_path / "rgb"), num_samples=12, shard_size=12, channels=3, prefix="rgb", seed=9)
    grown = copy_of(w, 2, ("conv",), str(tmp_path / "grown.zarr"))
    with pytest.raises(BuildError, match=r"--test-data .*rgb.* has 3-channel images, --data 1"):
        add_teachers(grown, [f"inv={w['inv']}"], settings(w, test_data=rgb.path))
    assert LogitCache.open(grown).teacher_names == ["conv"]
    add_teachers(grown, [f"inv={w['inv']}"], settings(w, test_data=test.path))
    both = fresh(w, str(tmp_path / "both.zarr"), 2, ("conv", "inv"), test_data=test.path)
    got, want = LogitCache.open(grown).attrs.teacher("inv"), LogitCache.open(both).attrs.teacher("inv")
    assert got.test_accuracy is not None and got.test_accuracy == want.test_accuracy
    assert got.extra["test_fingerprint"] == want.extra["test_fingerprint"] == test.fingerprint
    assert got.extra["test_samples"] == 24


def test_grow_refusals_are_one_line(grow_world, tmp_path):
    w = grow_world
    url = copy_of(w, 2, ("conv",), str(tmp_path / "c.zarr"))
    runner = CliRunner()
    for args, message in [(["extend", url, "--views", "1"], "fewer than the cache's E=2"),
                          (["extend", url, "--views", "3", "--teacher", f"conv={w['inv']}"], "is not the teacher"),
                          (["add-teacher", url, f"conv={w['inv']}"], "already has a teacher 'conv'"),
                          (["extend", str(tmp_path / "none.zarr"), "--views", "3"], "no cit cache at")]:
        r = runner.invoke(cache_cli, [*args, "--data", w["data"], "--no-progress"])
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (args, r.output)
    assert LogitCache.open(url).attrs.views == 2 and not LogitCache.open(url).attrs.growth


@pytest.mark.slow
def test_kill_9_during_extend_then_rerun_is_identical_and_readers_see_the_old_cache(grow_world, tmp_path):
    w = grow_world
    ref = reference(w, 3, ("conv",), fine=True)
    url = copy_of(w, 2, ("conv",), str(tmp_path / "killed.zarr"), fine=True)
    args = ["extend", url, "--views", "3", "--data", w["data"], "--no-progress", "--workers", "0"]
    proc = ForkedCli(cache_cli, args, str(tmp_path))
    new_done = [os.path.join(url, "done", "c", "2", str(c)) for c in range(N // 5)]
    proc.run_until(lambda: sum(map(os.path.exists, new_done)) >= 3, "the extend")
    proc.kill9()
    # a reader of the interrupted store sees the old complete cache: E=2, its views intact
    cache = LogitCache.open(url)
    assert cache.is_complete and cache.attrs.views == 2 and cache.attrs.growth == {"op": "extend", "views": 3}
    assert np.array_equal(cache.read_topk("conv", 1, 0, N).logp, LogitCache.open(ref).read_topk("conv", 1, 0, N).logp)
    from cache_builder import cache_info, format_info, verify_cache
    info = cache_info(url)
    assert info["complete"] and info["growth"]["op"] == "extend" and "a change is under way" in format_info(info)
    assert "a change (extend) is under way" in verify_cache(url).problems[0]
    with pytest.raises(BuildError, match="being changed by `cit cache extend`"):
        fresh(w, url, 2, ("conv",))
    r = CliRunner().invoke(cache_cli, args)          # the rerun, in this process
    assert r.exit_code == 0, r.output
    assert "units were already done" in r.output
    assert_same_cache(ref, url)


def _files(folder: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]


def test_merge_of_two_one_teacher_caches_equals_the_two_teacher_build(grow_world, tmp_path):
    w = grow_world
    a, b = reference(w, 2, ("conv",)), reference(w, 2, ("inv",))
    runner = CliRunner()
    r = runner.invoke(cache_cli, ["merge", a, b, "--out", str(tmp_path / "ab.zarr")])
    assert r.exit_code == 0, r.output
    both = reference(w, 2, ("conv", "inv"))
    assert_same_cache(both, str(tmp_path / "ab.zarr"))
    # export of one teacher (and fewer views) equals a one-teacher build
    r = runner.invoke(cache_cli, ["export", both, "--teachers", "inv", "--views", "1",
                                  "--out", str(tmp_path / "inv1.zarr")])
    assert r.exit_code == 0, r.output
    assert_same_cache(reference(w, 1, ("inv",)), str(tmp_path / "inv1.zarr"))
    # what they join is verified: one line naming what differs
    other = str(tmp_path / "other.zarr")
    build_cache(w["data"], [f"inv={w['inv']}"], other, views=2, topk=K, spec=SPEC, seed=6, batch_size=BATCH,
                workers=0, threads=1, progress=False)
    r = runner.invoke(cache_cli, ["merge", a, other, "--out", str(tmp_path / "bad.zarr")])
    assert r.exit_code == 2 and "they differ in seed: 5 vs 6" in r.output and r.output.count("\n") == 1, r.output
    r = runner.invoke(cache_cli, ["merge", a, str(tmp_path / "inv1.zarr"), "--out", str(tmp_path / "bad.zarr")])
    assert r.exit_code == 2 and "every teacher must cover the same views" in r.output, r.output
    r = runner.invoke(cache_cli, ["merge", a, b, "--out", str(tmp_path / "ab.zarr")])   # finished: nothing to do
    assert r.exit_code == 0 and "0 units in" in r.output, r.output
    r = runner.invoke(cache_cli, ["export", a, "--out", str(tmp_path / "ab.zarr")])
    assert r.exit_code == 2 and "pass --force" in r.output, r.output


def test_the_build_plan_is_a_pure_function_of_what_is_there_and_what_is_intended():
    from dataclasses import replace

    from cache_builder.plan import plan_build
    from shared.cache_schema import CacheAttrs, TeacherRecord
    conv = TeacherRecord("conv", "conv", "a", "sha1", 10, [0.5], [0.5])
    inv = TeacherRecord("inv", "inv", "b", "sha2", 10, [0.5], [0.5])
    have = CacheAttrs("fp", 60, 10, 2, 3, 5, {}, 20, [conv], status="complete", build={"batch_size": 8})
    assert plan_build("absent", None, have, False, "o").action == "create"
    assert plan_build("cache", have, replace(have, status="building"), False, "o").action == "resume"
    assert plan_build("cache", have, replace(have, views=3), True, "o").action == "replace"
    assert plan_build("foreign", None, have, True, "o").action == "refuse"
    more_views = plan_build("cache", have, replace(have, views=4), False, "o")
    assert more_views.action == "refuse" and "`cit cache extend o --views 4" in more_views.reason
    more_teachers = plan_build("cache", have, replace(have, teachers=[conv, inv]), False, "o")
    assert more_teachers.action == "refuse" and "`cit cache add-teacher o inv=CHECKPOINT" in more_teachers.reason
    other = plan_build("cache", have, replace(have, views=4, seed=6), False, "o")
    assert "already holds a different cache" in other.reason and "pass --force" in other.reason
    growing = plan_build("cache", replace(have, growth={"op": "extend", "views": 4}), have, False, "o")
    assert growing.action == "refuse" and "being changed by `cit cache extend`" in growing.reason


@pytest.mark.slow
def test_kill_9_during_add_teacher_then_rerun_is_identical(grow_world, tmp_path):
    w = grow_world
    ref = reference(w, 2, ("conv", "inv"), fine=True)
    url = copy_of(w, 2, ("conv",), str(tmp_path / "killed.zarr"), fine=True)
    args = ["add-teacher", url, f"inv={w['inv']}", "--data", w["data"], "--no-progress", "--workers", "0"]
    proc = ForkedCli(cache_cli, args, str(tmp_path))
    proc.run_until(lambda: count_written(os.path.join(url, "growth", "c")) >= 3, "add-teacher")
    proc.kill9()
    cache = LogitCache.open(url)       # the old complete cache: one teacher
    assert cache.is_complete and cache.teacher_names == ["conv"] and cache.attrs.growth["op"] == "add-teacher"
    r = CliRunner().invoke(cache_cli, args)          # the rerun, in this process
    assert r.exit_code == 0, r.output
    assert "units were already done" in r.output
    assert_same_cache(ref, url)


def test_extend_and_add_teacher_on_an_fsspec_url(grow_world, tmp_path):
    from tests.cache_fixtures import store_arrays
    w = grow_world
    url = f"memory://cit-grow-{os.getpid()}/c.zarr"
    fresh(w, url, 1, ("conv",))
    extend_cache(url, 2, settings(w))
    add_teachers(url, [f"inv={w['inv']}"], settings(w))
    ref = reference(w, 2, ("conv", "inv"))
    x, y = store_arrays(ref), store_arrays(url)
    assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k], equal_nan=True) for k in x)
    assert LogitCache.open(url).teacher_names == ["conv", "inv"] and LogitCache.open(url).attrs.views == 2


@pytest.mark.slow
def test_extend_under_torchrun_equals_one_process(grow_world, tmp_path):
    import sys

    from tests.cache_fixtures import free_port
    w = grow_world
    url = copy_of(w, 1, ("conv",), str(tmp_path / "ddp.zarr"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           "-m", "cache_builder.cli", "extend", url, "--views", "3", "--data", w["data"], "--no-progress",
           "--workers", "0"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("complete") == 1 and "built 6 units" in result.stdout, result.stdout
    assert_same_cache(reference(w, 3, ("conv",)), url)


def test_merge_of_two_view_ranges_equals_a_fresh_full_build(grow_world, tmp_path):
    """Views 0..1 built here, views 2..3 "on another machine" (`build --views-from 2`): merged, a fresh 4-view
    build; an overlap is joined only where both agree bit for bit; a gap is refused naming the missing views."""
    w = grow_world
    a = reference(w, 2, ("conv",))
    b = str(tmp_path / "b.zarr")
    runner = CliRunner()
    r = runner.invoke(cache_cli, ["build", "--data", w["data"], "--teacher", f"conv={w['conv']}", "--views", "4",
                                  "--views-from", "2", "--out", b, "--topk", str(K), "--seed", "5", "--batch-size",
                                  str(BATCH), "--workers", "0", "--threads", "1", "--no-progress",
                                  *[f"--set=augment.{k}={v}" for k, v in AUG.items()]])
    assert r.exit_code == 0 and "built 6 units" in r.output, r.output
    stored = zarr.open_group(b, mode="r")
    assert stored.attrs["first_view"] == 2 and not np.any(stored["done"][:2]) and np.all(stored["done"][2:] == 1)
    with pytest.raises(CacheError, match=r"holds views 2\.\.3 only \(a view range\).*cit cache merge"):
        LogitCache.open(b)                       # what a training opens: a range is refused
    full = reference(w, 4, ("conv",))
    r = runner.invoke(cache_cli, ["merge", a, b, "--out", str(tmp_path / "ab.zarr")])
    assert r.exit_code == 0 and "E=4" in r.output, r.output
    assert_same_cache(full, str(tmp_path / "ab.zarr"))
    # an overlap (view 1 in both) that agrees bit for bit is joined
    r = runner.invoke(cache_cli, ["export", full, "--views-from", "1", "--out", str(tmp_path / "r13.zarr")])
    assert r.exit_code == 0 and "views 1..3 (a range)" in r.output, r.output
    r = runner.invoke(cache_cli, ["merge", a, str(tmp_path / "r13.zarr"), "--out", str(tmp_path / "ov.zarr")])
    assert r.exit_code == 0, r.output
    assert_same_cache(full, str(tmp_path / "ov.zarr"))
    # an overlap that differs stops the merge at the first different unit; the result is never complete
    tampered = shutil.copytree(str(tmp_path / "r13.zarr"), str(tmp_path / "bad13.zarr"))
    logp = zarr.open_group(tampered, mode="r+")["conv/logp"]
    logp[1, 25] = logp[1, 25] - np.float16(0.5)
    r = runner.invoke(cache_cli, ["merge", a, tampered, "--out", str(tmp_path / "bad.zarr")])
    assert r.exit_code == 2 and "disagree on conv/logp at view 1, rows 20..40" in r.output, r.output
    with pytest.raises(CacheError, match="incomplete"):
        LogitCache.open(str(tmp_path / "bad.zarr"))
    # a gap: views 0..1 and 3..3 leave view 2 in neither
    r = runner.invoke(cache_cli, ["export", full, "--views-from", "3", "--out", str(tmp_path / "r3.zarr")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cache_cli, ["merge", a, str(tmp_path / "r3.zarr"), "--out", str(tmp_path / "gap.zarr")])
    assert r.exit_code == 2 and "views 2 are in neither" in r.output and "--views-from 2 --views 3" in r.output, \
        r.output
    assert not os.path.exists(str(tmp_path / "gap.zarr"))        # refused before anything is written
    r = runner.invoke(cache_cli, ["build", "--data", w["data"], "--teacher", f"conv={w['conv']}", "--views", "4",
                                  "--views-from", "4", "--out", str(tmp_path / "none.zarr")])
    assert r.exit_code == 2 and "--views-from 4 must be in 0..3" in r.output and r.output.count("\n") == 1, r.output


FINE = dict(topk=K, spec=SPEC, seed=5, batch_size=4, chunk_rows=5, workers=0, threads=1, progress=False)


@pytest.fixture(scope="module")
def fine_caches(grow_world, tmp_path_factory):
    """Caches of 5-row chunks (12 chunks x 3 views): copying them takes long enough to be killed in the middle."""
    w = grow_world
    root = tmp_path_factory.mktemp("fine")
    out = {name: reference(w, 3, (name,), fine=True) for name in ("conv", "inv")}
    out["both"] = str(root / "both.zarr")
    merge_caches(out["conv"], out["inv"], out["both"])      # equal to a fresh build (tested above)
    return out


def _kill_in_the_middle(args: list[str], out: str) -> None:
    """Start ``cit cache ARGS`` writing ``out``, kill -9 it once a few units are done; a reader in between is
    refused (the result is being written), and after the kill too (incomplete: rerun)."""
    proc = ForkedCli(cache_cli, args, os.path.dirname(out))
    proc.run_until(lambda: count_written(os.path.join(out, "done", "c")) >= 3, args[0])
    with pytest.raises(CacheError, match="is being built by pid"):
        LogitCache.open(out)
    proc.kill9()
    with pytest.raises(CacheError, match=r"incomplete .*rerunning the command that wrote it"):
        LogitCache.open(out)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["merge", "export"])
def test_kill_9_during_merge_and_export_then_rerun_is_identical(fine_caches, tmp_path, op):
    c = fine_caches
    out, ref = str(tmp_path / f"{op}.zarr"), str(tmp_path / f"{op}-uninterrupted.zarr")
    if op == "merge":
        args, ref = ["merge", c["conv"], c["inv"], "--out", out], c["both"]
    else:
        args = ["export", c["both"], "--views-from", "1", "--out", out]
        export_cache(c["both"], ref, first_view=1)
    _kill_in_the_middle(args, out)
    r = CliRunner().invoke(cache_cli, args)          # the rerun, in this process
    assert r.exit_code == 0, r.output
    skipped = int(r.output.split(" units were already done")[0].rsplit(" ", 1)[1])
    assert 3 <= skipped < LogitCache.open(ref, allow_view_range=True).attrs.num_units, r.output
    assert_same_cache(ref, out)


def start_readers(url: str, reference: str, stop: str, count: int, *extra: str) -> list:
    readers = [subprocess.Popen([sys.executable, "-m", "tests.grow_reader", url, reference, stop, *extra],
                                cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(count)]
    for reader in readers:
        assert reader.stdout.readline().strip() == "ready", reader.communicate()
    return readers


def reader_reports(readers: list, stop: str) -> list[dict]:
    open(stop, "w").close()
    reports = []
    for reader in readers:
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.mark.slow
def test_many_readers_during_extend_and_add_teacher_read_the_old_or_the_new_complete_cache(grow_world, tmp_path):
    """Three reader processes read one cache (each view against a fresh build of the final cache, bit for bit)
    while this process extends it 2 -> 4 views and then adds a teacher: each sees only complete states, in
    order, and never a wrong value."""
    w = grow_world
    url, stop = copy_of(w, 2, ("conv",), str(tmp_path / "shared.zarr")), str(tmp_path / "stop")
    readers = start_readers(url, reference(w, 4, ("conv", "inv")), stop, 3, "null", "0.15")
    extend_cache(url, 4, settings(w))                          # the change, in this process
    add_teachers(url, [f"inv={w['inv']}"], settings(w))
    reports = reader_reports(readers, stop)
    old, extended, final = [2, ["conv"]], [4, ["conv"]], [4, ["conv", "inv"]]
    for report in reports:
        assert report["wrong"] == [] and report["refusals"] == [], report
        assert report["states"][0] == old and report["states"][-1] == final, report
        assert all(s in (old, extended, final) for s in report["states"]), report
    assert sum(r["during_change"] for r in reports) > 0, reports    # the readers did read while it changed


@pytest.fixture(scope="module")
def s3_options():
    """One moto S3 server for this module's s3:// tests, with a bucket ``cit-grow``; yields the storage options."""
    pytest.importorskip("s3fs")
    from tests.cache_fixtures import start_moto
    server, port = start_moto()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            import s3fs
            s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("cit-grow")
            yield options
    finally:
        server.stop()


@pytest.fixture(scope="module")
def small_world(grow_world):
    """20 samples in one shard (one unit per view) for the s3:// changes: every S3 request is slow."""
    root = grow_world["root"] / "small"
    data = make_shards(str(root / "train"), num_samples=20, shard_size=20, prefix="gs", seed=4)
    return {**grow_world, "root": root, "data": data.path, "built": {}}


@pytest.mark.slow
def test_extend_add_teacher_export_and_merge_on_s3(small_world, s3_options, tmp_path):
    import s3fs
    w, o = small_world, s3_options
    url = "s3://cit-grow/c.zarr"
    build_cache(w["data"], [f"conv={w['conv']}"], url, views=1, topk=K, spec=SPEC, seed=5, batch_size=BATCH,
                workers=0, threads=1, progress=False, storage_options=o)
    ref = reference(w, 2, ("conv", "inv"))
    stop = str(tmp_path / "stop")
    readers = start_readers(url, ref, stop, 1, json.dumps(o), "0.6")     # trainings reading the s3 cache meanwhile
    extend_cache(url, 2, settings(w, storage_options=o))
    add_teachers(url, [f"inv={w['inv']}"], settings(w, storage_options=o))
    for report in reader_reports(readers, stop):
        assert report["wrong"] == [] and report["refusals"] == [], report
        assert report["states"][0] == [1, ["conv"]] and report["states"][-1] == [2, ["conv", "inv"]], report
        assert all(s in ([1, ["conv"]], [2, ["conv"]], [2, ["conv", "inv"]]) for s in report["states"]), report

    def same(cache_url: str) -> None:
        assert_bit_identical(ref, cache_url, o)
        attrs = dict(zarr.open_group(cache_url, mode="r", storage_options=o).attrs)
        attrs.pop("provenance")
        assert attrs == public_attrs(ref)
    same(url)
    for name in ("conv", "inv"):
        export_cache(url, f"s3://cit-grow/{name}.zarr", teachers=[name], storage_options=o)
    merge_caches("s3://cit-grow/conv.zarr", "s3://cit-grow/inv.zarr", "s3://cit-grow/m.zarr", storage_options=o)
    same("s3://cit-grow/m.zarr")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **o)
    assert not [p for p in fs.ls("cit-grow") if p.endswith(".lock")]        # every lease given back


def test_an_s3_lease_is_a_conditional_put(s3_options, monkeypatch):
    """Two takers that both found no lease: the second's conditional put fails, it is refused at once (without the
    condition both would write, and the later one would read its own token back and also hold the store)."""
    from shared import store_lock
    first = store_lock.StoreLock("s3://cit-grow/race.zarr", s3_options).acquire()
    real, calls = store_lock.read_lease, []

    def missed_the_first(*args, **kwargs):      # the second taker looked before the first one's lease was there
        calls.append(1)
        return None if len(calls) == 1 else real(*args, **kwargs)
    monkeypatch.setattr(store_lock, "read_lease", missed_the_first)
    try:
        with pytest.raises(store_lock.StoreLockedError, match=f"being built by pid {os.getpid()}"):
            store_lock.StoreLock("s3://cit-grow/race.zarr", s3_options).acquire()
    finally:
        first.release()
    assert store_lock.read_lease("s3://cit-grow/race.zarr", s3_options) is None


def test_a_view_range_grows_like_a_cache(grow_world, tmp_path):
    """add-teacher on a range computes the new teacher on its views only; extend adds views after its end."""
    w = grow_world
    url = str(tmp_path / "range.zarr")
    build_cache(w["data"], [f"conv={w['conv']}"], url, views=3, first_view=2, topk=K, spec=SPEC, seed=5,
                batch_size=BATCH, workers=0, threads=1, progress=False)
    assert add_teachers(url, [f"inv={w['inv']}"], settings(w)).units_built == N // SHARD
    assert extend_cache(url, 4, settings(w)).units_built == N // SHARD
    full = reference(w, 4, ("conv", "inv"))
    assert_same_cache(export_cache(full, str(tmp_path / "full24.zarr"), first_view=2).url, url)
