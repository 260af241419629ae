"""Grow a complete cache without recomputing it: more views (``extend``), more teachers (``add_teachers``).

Both give, bit for bit, the cache a fresh ``cit cache build`` with the final views / teachers would write: the new
units are computed exactly as the build computes them (same rows per batch, batch size, precision, device type and
CPU thread count, all taken from the cache), and no byte of the existing views or teacher groups is rewritten.

What readers see while a cache grows (the documented states): the *old complete cache*.  The change is announced in
the ``growth`` attribute first (``status`` stays ``complete``, ``views`` / ``teachers`` keep their old values), the
arrays grow beside the old data (``zarr.Array.resize`` to more views only rewrites the array's metadata; existing
chunks are untouched; new teacher groups are new arrays), and the new units are written; then one write of the
group attributes switches readers to the new complete cache.  A reader that opened the cache before keeps reading
the old views and teachers, whose chunks never change.  Plain-Zarr readers see the larger shapes early: views
>= the ``views`` attribute (and groups not in ``teachers``) are not part of the cache until the switch.

Crash safety: new units are marked in a completion map (``done`` for new views; a temporary ``growth`` map for new
teachers, removed after the switch) after their data; a rerun of the same command under the store lease skips the
finished units, so a kill -9 at any point followed by a rerun gives the identical cache.  Under ``torchrun`` rank 0
does every check and store change, and each rank computes a contiguous share of the new units.

A view range cache (views F..E-1, ``first_view`` F) grows the same way: ``extend`` adds views E..E2-1 and
``add_teachers`` computes the new teachers on views F..E-1 only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from cache_builder.build import BuildSummary, _probe
from cache_builder.errors import BuildError
from cache_builder.plan import group_units, rank_share
from cache_builder.runner import _run_units, write_whole_unit
from cache_builder.session import StoreSession, _Dist
from cache_builder.store import _remove_partial_writes
from cache_builder.streams import (check_shards_readable, check_teacher_channels, measure_accuracy,
                                   open_test_set, record_accuracy)
from cache_builder.teachers import TeacherRunner, load_teachers, parse_teacher_args, resolve_device
from shared.augment import ViewSpec
from shared.cache_schema import (GROWTH_DONE, CacheAttrs, CacheError, LogitCache, TeacherRecord, create_arrays,
                                 expected_arrays, normalize_url)
from shared.manifest import Manifest, ManifestError
from shared.store_lock import StoreLock


@dataclass
class GrowSettings:
    """What ``cit cache extend`` / ``add-teacher`` take besides the change itself (the rest comes from the cache)."""
    data: str                                # manifest the cache was built from (its fingerprint is checked)
    teachers: tuple[str, ...] = ()           # NAME=CHECKPOINT overrides of the checkpoints the cache recorded
    device: str = "auto"
    workers: int | None = None
    test_data: str | None = None             # add-teacher: measure the new teachers' accuracy on it
    verify_shards: bool = True
    storage_options: dict | None = None
    progress: bool = True


@dataclass
class _Context:
    url: str
    cache: LogitCache
    manifest: Manifest
    spec: ViewSpec
    device: torch.device
    comm: object = None          # session._Dist under torchrun (rank 0's context), else None


def extend_cache(url: str, views: int, settings: GrowSettings) -> BuildSummary:
    """Add views E..views-1 to the complete cache at ``url`` (see the module doc)."""
    return _grow(url, settings, lambda ctx: _extend(ctx, views, settings))


def add_teachers(url: str, teachers, settings: GrowSettings) -> BuildSummary:
    """Add teacher groups (``["NAME=CKPT", ...]``, appended in that order) to the complete cache at ``url``."""
    pairs = parse_teacher_args(teachers)
    return _grow(url, settings, lambda ctx: _add(ctx, pairs, settings))


# ---------------------------------------------------------------------------------------------------------------

def _grow(url: str, settings: GrowSettings, change) -> BuildSummary:
    """Rank 0 checks, announces, grows the arrays and switches; under torchrun every rank computes a contiguous
    share of the new units (rank 0 sends the work order, see ``_run``)."""
    error, result = None, None
    with StoreSession() as session:
        comm = session.comm
        if comm.rank != 0:
            return _follow(comm, url, settings)
        try:
            session.lock = StoreLock(normalize_url(url), settings.storage_options,
                                     command="cit cache grow").acquire()
            ctx = _open(url, settings)
            _remove_partial_writes(url)       # a killed change's temporary files; before any rank writes
            ctx.comm = comm
            result = change(ctx)
        except BaseException as exc:
            error = exc
            raise
        finally:
            comm.broadcast(("end", None if error is None else f"{type(error).__name__}: {error}",
                            None if result is None else asdict(result)))
        return result


def _follow(comm: _Dist, url: str, settings: GrowSettings) -> BuildSummary:
    """Ranks > 0: run the share of each work order rank 0 sends, until it says the change ended."""
    failure = None
    while True:
        message = comm.broadcast(None)
        if message[0] == "end":
            if failure is not None:
                raise failure
            if message[1] is not None:
                raise BuildError(f"rank 0 stopped the change: {message[1]}")
            return BuildSummary(**message[2])
        _, kind, pairs, units, target_json = message
        failed = built = views_built = 0
        try:
            ctx = _open(url, replace(settings, verify_shards=False))   # rank 0 checked the shards' sha256
            ctx.comm = comm
            runner = _runner(ctx, pairs)
            if kind == "extend":
                sink = write_whole_unit(LogitCache(ctx.cache.root, CacheAttrs.from_json_dict(target_json), url))
            else:
                sink = _teacher_sink(ctx)
            built, views_built = _run_share(ctx, runner, sink, rank_share(units, comm.rank, comm.world), settings)
        except Exception as exc:  # noqa: BLE001 — reported after the collective below, so no rank hangs
            failed, failure = 1, exc
        comm.sum(failed), comm.sum(built), comm.sum(views_built)


def _open(url: str, settings: GrowSettings) -> _Context:
    cache = LogitCache.open(url, "r+", storage_options=settings.storage_options,   # refuses an incomplete cache
                            allow_view_range=True)
    attrs = cache.attrs
    try:
        manifest = Manifest.load(settings.data)
    except ManifestError as exc:
        raise BuildError(str(exc)) from None
    if manifest.fingerprint != attrs.dataset_fingerprint:
        raise BuildError(f"--data {settings.data} is dataset {manifest.fingerprint[:12]}… but cache {url} was built "
                         f"for {attrs.dataset_fingerprint[:12]}…; pass the manifest the cache was built from")
    check_shards_readable(manifest, settings.verify_shards)
    device = resolve_device(settings.device)
    if device.type != attrs.build.get("device"):
        raise BuildError(f"cache {url} was built on {attrs.build.get('device')}; its new units must be computed "
                         f"there too (the device type changes the bits), not on {device.type}: pass --device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if attrs.build.get("cpu_threads") and device.type == "cpu":
        torch.set_num_threads(int(attrs.build["cpu_threads"]))
    return _Context(url, cache, manifest, ViewSpec.from_dict(attrs.augment), device)


def _runner(ctx: _Context, pairs: list[tuple[str, str]]) -> TeacherRunner:
    attrs = ctx.cache.attrs
    loaded = load_teachers(pairs, ctx.manifest.num_classes, ctx.device, view_size=ctx.spec.image_size)
    check_teacher_channels(loaded, ctx.manifest)
    return TeacherRunner(loaded, ctx.device, attrs.build["precision"], attrs.topk, tuple(attrs.temperatures),
                         attrs.features)


def _run(ctx: _Context, runner: TeacherRunner, sink, units: list[tuple[int, int]], settings: GrowSettings,
         kind: str, target: CacheAttrs) -> tuple[int, int]:
    """Rank 0: compute the pending ``units`` (with torchrun: send the order and compute rank 0's share)."""
    comm = ctx.comm
    if comm is None or comm.world == 1:
        return _run_share(ctx, runner, sink, units, settings)
    pairs = [(t.name, t.checkpoint) for t in runner.teachers]
    comm.broadcast(("units", kind, pairs, units, target.to_json_dict()))
    failed = built = views_built = 0
    try:
        built, views_built = _run_share(ctx, runner, sink, rank_share(units, comm.rank, comm.world), settings)
    except BaseException:
        failed = 1
        raise
    finally:
        failed, built, views_built = comm.sum(failed), comm.sum(built), comm.sum(views_built)
    if failed:
        raise BuildError(f"another rank failed; cache {ctx.url} still shows its complete old state (rerun to resume)")
    return built, views_built


def _run_share(ctx: _Context, runner: TeacherRunner, sink, units: list[tuple[int, int]],
               settings: GrowSettings) -> tuple[int, int]:
    workers = settings.workers if settings.workers is not None else (1 if ctx.device.type == "cpu" else 4)
    groups = group_units(units)
    return _run_units(sink, runner, ctx.manifest, ctx.spec, ctx.cache.attrs.seed, ctx.cache.attrs, groups,
                      ctx.cache.attrs.build["batch_size"], min(workers, max(1, len(groups))),
                      settings.progress and (ctx.comm is None or ctx.comm.rank == 0))


def _put_attrs(ctx: _Context, attrs: CacheAttrs) -> None:
    ctx.cache.root.attrs.put(attrs.to_json_dict())
    ctx.cache.attrs = attrs


# ---------------------------------------------------------------------------------------------------------------
# More views

def _extend(ctx: _Context, views: int, settings: GrowSettings) -> BuildSummary:
    started = time.perf_counter()
    attrs = ctx.cache.attrs
    pending_growth = attrs.growth
    if pending_growth and (pending_growth.get("op") != "extend" or pending_growth.get("views") != views):
        raise BuildError(f"cache {ctx.url} is in the middle of another change ({_describe(pending_growth)}); "
                         "rerun that command to finish it first")
    if views < attrs.views:
        raise BuildError(f"--views {views} is fewer than the cache's E={attrs.views}; a cache only grows (export "
                         f"a smaller one with `cit cache export {ctx.url} --views {views} --out DST`)")
    if views == attrs.views and not pending_growth:
        return BuildSummary(ctx.url, True, 0, 0, attrs.num_units, time.perf_counter() - started,
                            {t.name: t.test_accuracy for t in attrs.teachers})
    overrides = dict(parse_teacher_args(settings.teachers)) if settings.teachers else {}
    unknown = sorted(set(overrides) - {t.name for t in attrs.teachers})
    if unknown:
        raise BuildError(f"--teacher {unknown[0]} is not a teacher of cache {ctx.url} (it has "
                         f"{[t.name for t in attrs.teachers]}); use `cit cache add-teacher` to add one")
    pairs = [(t.name, overrides.get(t.name) or _recorded_checkpoint(ctx.url, t)) for t in attrs.teachers]
    runner = _runner(ctx, pairs)
    for loaded, stored in zip(runner.teachers, attrs.teachers):
        if loaded.record.identity() != stored.identity():
            raise BuildError(f"teacher {stored.name}: checkpoint {loaded.checkpoint} is not the teacher cache "
                             f"{ctx.url} was built with ({_first_diff(loaded.record, stored)}); pass the right "
                             f"one with --teacher {stored.name}=CHECKPOINT")
    target = replace(attrs, views=views, growth={})
    if not pending_growth:
        _probe(runner, ctx.manifest, ctx.spec, attrs.seed, attrs.chunk_rows)
        _put_attrs(ctx, replace(attrs, growth={"op": "extend", "views": views}))     # 1. announce
    for path, (shape, _, _) in expected_arrays(target, ctx.spec.num_params).items():  # 2. grow (metadata only)
        array = ctx.cache.array(path)
        if tuple(array.shape) != shape:
            array.resize(shape)
    done = ctx.cache.done_map()
    units = [(c, v) for c in range(attrs.num_chunks) for v in range(attrs.views, views) if done[v, c] != 1]
    skipped = target.num_units - len(units)
    writer = LogitCache(ctx.cache.root, target, ctx.url)     # writes units of the target layout
    loop = time.perf_counter()
    built_units, built_views = _run(ctx, runner, write_whole_unit(writer), units, settings,  # 3. new units
                                    "extend", target)
    if not np.all(ctx.cache.done_map() == 1):
        raise BuildError(f"cache {ctx.url}: some new views are missing after the run; rerun the command")
    _put_attrs(ctx, target)                                                           # 4. switch
    now = time.perf_counter()
    return BuildSummary(ctx.url, True, built_views, built_units, skipped, now - started,
                        {t.name: t.test_accuracy for t in target.teachers}, now - loop)


# ---------------------------------------------------------------------------------------------------------------
# More teachers

def _add(ctx: _Context, pairs: list[tuple[str, str]], settings: GrowSettings) -> BuildSummary:
    started = time.perf_counter()
    attrs = ctx.cache.attrs
    pending_growth = attrs.growth
    present = {t.name for t in attrs.teachers}
    runner = _runner(ctx, pairs)
    records = [t.record for t in runner.teachers]
    if pending_growth:
        planned = [TeacherRecord(**r) for r in pending_growth.get("teachers", [])]
        if pending_growth.get("op") != "add-teacher" or [r.identity() for r in planned] != \
                [r.identity() for r in records]:
            raise BuildError(f"cache {ctx.url} is in the middle of another change ({_describe(pending_growth)}); "
                             "rerun that command to finish it first")
        records = planned                     # keep the accuracy measured by the interrupted run
    else:
        stored = {t.name: t for t in attrs.teachers}
        already = [r.name for r in records if r.name in present]
        if already and all(stored[r.name].identity() == r.identity() for r in records
                           if r.name in stored) and len(already) == len(records):
            _drop_growth_map(ctx)              # an interrupted run that had already switched: only tidy up
            return BuildSummary(ctx.url, True, 0, 0, attrs.num_units, time.perf_counter() - started,
                                {t.name: t.test_accuracy for t in attrs.teachers})
        if already:
            raise BuildError(f"cache {ctx.url} already has a teacher {already[0]!r}; choose another NAME")
        _probe(runner, ctx.manifest, ctx.spec, attrs.seed, attrs.chunk_rows)
        if settings.test_data:
            _measure(ctx, runner, records, settings)
        _put_attrs(ctx, replace(attrs, growth={"op": "add-teacher",                   # 1. announce
                                               "teachers": [asdict(r) for r in records]}))
    target = replace(attrs, teachers=list(attrs.teachers) + records, growth={})
    paths = [p for p in expected_arrays(target, ctx.spec.num_params) if p.split("/")[0] in {r.name for r in records}]
    have = _array_paths(ctx)
    missing = [p for p in paths + [GROWTH_DONE] if p not in have]
    create_arrays(ctx.cache.root, target, ctx.spec.num_params, paths=missing)        # 2. new, empty arrays
    ctx.cache._arrays.clear()
    growth_done = np.asarray(ctx.cache.array(GROWTH_DONE)[:])
    units = [(c, v) for c in range(attrs.num_chunks) for v in attrs.view_range if growth_done[v, c] != 1]
    loop = time.perf_counter()
    built_units, built_views = _run(ctx, runner, _teacher_sink(ctx), units, settings,  # 3. new groups
                                    "add-teacher", target)
    if not np.all(np.asarray(ctx.cache.array(GROWTH_DONE)[attrs.first_view:]) == 1):
        raise BuildError(f"cache {ctx.url}: some units of the new teachers are missing; rerun the command")
    _put_attrs(ctx, target)                                                           # 4. switch
    _drop_growth_map(ctx)                                                             # 5. tidy up
    now = time.perf_counter()
    return BuildSummary(ctx.url, True, built_views, built_units, attrs.num_units - len(units), now - started,
                        {t.name: t.test_accuracy for t in target.teachers}, now - loop)


def _teacher_sink(ctx: _Context):
    """Write only the new teachers' arrays of a unit, after checking that this process rendered exactly the stored
    views (params records and pixel digests): a new teacher must see the pixels the others saw."""
    cache = ctx.cache

    def sink(view: int, chunk: int, params: np.ndarray, outputs: dict, digests: np.ndarray) -> None:
        lo, hi = cache.attrs.chunk_rows_range(chunk)
        stored_params, stored_digests = cache.read_rows(["params", "digest"], view, lo, hi)
        same = np.array_equal(stored_params.view(np.uint32), np.asarray(params, np.float32).view(np.uint32))
        if not same or not np.array_equal(stored_digests, np.asarray(digests, np.uint32)):
            bad = int(np.argmax((stored_digests != np.asarray(digests, np.uint32))
                                | ~(stored_params.view(np.uint32) == params.view(np.uint32)).all(axis=1)))
            raise BuildError(f"view {view} of row {lo + bad} renders differently here than when cache {ctx.url} "
                             "was built (another Pillow/numpy, or changed shards); a new teacher would see other "
                             "pixels than the cached ones — add it where the cache was built")
        cache.write_teachers(outputs, view, lo, hi)
        cache.array(GROWTH_DONE)[view, chunk] = 1
    return sink


def _measure(ctx: _Context, runner: TeacherRunner, records: list[TeacherRecord], settings: GrowSettings) -> None:
    test = open_test_set(settings.test_data, ctx.manifest)
    check_shards_readable(test, settings.verify_shards)
    acc = measure_accuracy(runner, test, ctx.spec, ctx.cache.attrs.build["batch_size"], 0, settings.progress)
    record_accuracy(records, acc, test)


def _array_paths(ctx: _Context) -> set[str]:
    out = set()

    def walk(group, prefix):
        for name, node in group.members():
            if hasattr(node, "members"):
                walk(node, prefix + name + "/")
            else:
                out.add(prefix + name)
    walk(ctx.cache.root, "")
    return out


def _drop_growth_map(ctx: _Context) -> None:
    if GROWTH_DONE in _array_paths(ctx):
        del ctx.cache.root[GROWTH_DONE]
    ctx.cache._arrays.pop(GROWTH_DONE, None)


def _recorded_checkpoint(url: str, record: TeacherRecord) -> str:
    path = record.extra.get("checkpoint")
    if not path:
        raise BuildError(f"cache {url} records no checkpoint for teacher {record.name}; pass --teacher "
                         f"{record.name}=CHECKPOINT")
    return path


def _first_diff(a: TeacherRecord, b: TeacherRecord) -> str:
    x, y = a.identity(), b.identity()
    key = next(k for k in x if x[k] != y.get(k))
    return f"{key}: {str(x[key])[:40]} vs the cache's {str(y.get(key))[:40]}"


def _describe(growth: dict) -> str:
    if growth.get("op") == "extend":
        return f"`cit cache extend --views {growth.get('views')}`"
    names = [t.get("name") for t in growth.get("teachers", [])]
    return f"`cit cache add-teacher` of {', '.join(map(str, names))}"


__all__ = ["GrowSettings", "extend_cache", "add_teachers", "CacheError"]
