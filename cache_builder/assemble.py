"""Caches made from other caches, without running a teacher: ``merge`` (teachers of two caches of the same data,
views and build settings) and ``export`` (some teachers and the first views of one cache, to share).

Both verify what they join before writing anything — every identity field but the teachers and E must agree (the
first that differs is named) — and, while copying, that arrays two sources both hold (params records, pixel
digests, a teacher present in both) are equal bit for bit.  The result is the cache a fresh build with the final
teachers (merge: A's in A's order, then B's new ones; export: in the order asked) and views would write.  Writing
goes through the build's states (creating -> building -> complete) and ``done`` map under the store lease, so a
killed merge or export resumes where it stopped when rerun.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from cache_builder.errors import BuildError
from cache_builder.store import inspect_out, remove_store
from shared.cache_schema import (STATUS_BUILDING, STATUS_COMPLETE, STATUS_CREATING, CacheAttrs,
                                 LogitCache, create_arrays, normalize_url, open_root)
from shared.augment import ViewSpec
from shared.store_lock import StoreLock


@dataclass
class AssembleSummary:
    url: str
    units_copied: int
    units_skipped: int
    seconds: float
    teachers: list[str]
    views: int

    def line(self) -> str:
        return (f"cache {self.url}: complete; E={self.views}, teachers {', '.join(self.teachers)}; copied "
                f"{self.units_copied} units in {self.seconds:.1f}s; {self.units_skipped} units were already done")


@dataclass
class _Plan:
    target: CacheAttrs
    sources: list[LogitCache]
    shared_from: list[int]               # params/digest: the sources holding each view, first one is copied
    teacher_from: dict[str, list[int]]   # teacher -> the sources holding it (first copied, the others compared)


def merge_caches(a: str, b: str, out: str, *, force: bool = False,
                 storage_options: dict | None = None) -> AssembleSummary:
    """C = A's teachers + B's other teachers (same data, spec, seed, E, K and build settings)."""
    sa, sb = _open(a, storage_options), _open(b, storage_options)
    diff = _diff(sa.attrs, sb.attrs)
    if diff:
        raise BuildError(f"cannot merge {a} and {b}: they differ in {diff[0]}" +
                         (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))
    if sa.attrs.views != sb.attrs.views:
        raise BuildError(f"cannot merge {a} (E={sa.attrs.views}) and {b} (E={sb.attrs.views}): every teacher must "
                         f"cover the same views; `cit cache extend` the smaller one to E="
                         f"{max(sa.attrs.views, sb.attrs.views)} first")
    teachers = list(sa.attrs.teachers)
    names = [t.name for t in teachers]
    for record in sb.attrs.teachers:
        if record.name in names:
            if _teacher_id(record) != _teacher_id(sa.attrs.teacher(record.name)):
                raise BuildError(f"cannot merge {a} and {b}: both have a teacher {record.name!r} but not the same "
                                 "one (checkpoint or settings differ); export one of them without it first")
        else:
            teachers.append(record)
    target = replace(sa.attrs, teachers=teachers, growth={}, status=STATUS_CREATING)
    holders = {t.name: [i for i, s in enumerate((sa, sb)) if t.name in s.teacher_names] for t in teachers}
    return _assemble(_Plan(target, [sa, sb], [0, 1], holders), out, force, storage_options)


def export_cache(src: str, out: str, *, teachers: list[str] | None = None, views: int | None = None,
                 force: bool = False, storage_options: dict | None = None) -> AssembleSummary:
    """A smaller cache: the ``teachers`` named (in that order; default all) and views 0..views-1 (default all)."""
    source = _open(src, storage_options)
    attrs = source.attrs
    names = list(teachers) if teachers else source.teacher_names
    if len(set(names)) != len(names):
        raise BuildError(f"--teachers lists a teacher twice: {names}")
    for name in names:
        if name not in source.teacher_names:
            raise BuildError(f"cache {src} has no teacher {name!r} (it has {source.teacher_names})")
    views = attrs.views if views is None else views
    if not 1 <= views <= attrs.views:
        raise BuildError(f"--views {views}: cache {src} has views 0..{attrs.views - 1}; export 1..{attrs.views}")
    target = replace(attrs, teachers=[attrs.teacher(n) for n in names], views=views, growth={},
                     status=STATUS_CREATING)
    return _assemble(_Plan(target, [source], [0], {n: [0] for n in names}), out, force, storage_options)


# ---------------------------------------------------------------------------------------------------------------

def _open(url: str, storage_options: dict | None) -> LogitCache:
    return LogitCache.open(url, storage_options=storage_options)


def _teacher_id(record) -> dict:
    from cache_builder.grow import teacher_identity
    return teacher_identity(record)


def _diff(a: CacheAttrs, b: CacheAttrs) -> list[str]:
    """Identity fields (but teachers and E) that differ, readable."""
    x, y = a.identity(), b.identity()
    return [f"{k} ({_show(x.get(k))} vs {_show(y.get(k))})" for k in sorted(set(x) | set(y))
            if k not in ("teachers", "views") and x.get(k) != y.get(k)]


def _show(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _assemble(plan: _Plan, out: str, force: bool, storage_options: dict | None) -> AssembleSummary:
    started = time.perf_counter()
    for source in plan.sources:
        if normalize_url(source.url).rstrip("/") == normalize_url(out).rstrip("/"):
            raise BuildError(f"--out {out} is one of the inputs; write the result elsewhere")
    lock = StoreLock(normalize_url(out), storage_options, command="cit cache merge/export").acquire()
    try:
        cache = _prepare_out(plan, out, force, storage_options)
        done = cache.done_map()
        target = plan.target
        units = [(v, c) for v in range(target.views) for c in range(target.num_chunks) if done[v, c] != 1]
        for v, c in units:
            _copy_unit(plan, cache, v, c)
        if not cache.mark_complete():
            raise BuildError(f"cache {out}: some units are missing after the copy; rerun the command")
        return AssembleSummary(out, len(units), target.num_units - len(units), time.perf_counter() - started,
                               [t.name for t in target.teachers], target.views)
    finally:
        lock.release()


def _prepare_out(plan: _Plan, out: str, force: bool, storage_options: dict | None) -> LogitCache:
    """Create the output cache, or reopen an interrupted one that is being made into the same cache."""
    state, existing = inspect_out(out, storage_options)
    target = plan.target
    num_params = ViewSpec.from_dict(target.augment).num_params
    same = state == "cache" and existing.identity() == target.identity() and existing.status != STATUS_CREATING
    if state in ("cache", "old format", "foreign") and not same:
        if not force:
            what = "a complete cache" if state == "cache" and existing.status == STATUS_COMPLETE else "something"
            raise BuildError(f"--out {out} already holds {what} that is not this result; pass --force to replace "
                             "it, or choose another --out")
        remove_store(out, storage_options)
    if not same:
        root = open_root(out, "w", storage_options)
        root.attrs.put(target.to_json_dict())
        create_arrays(root, target, num_params)
        root.attrs.put(replace(target, status=STATUS_BUILDING).to_json_dict())
    return LogitCache.open(out, "r+", allow_incomplete=True, storage_options=storage_options)


def _copy_unit(plan: _Plan, cache: LogitCache, view: int, chunk: int) -> None:
    """Copy one (view, chunk) unit into every array of the result (comparing duplicates), then mark it done."""
    lo, hi = plan.target.chunk_rows_range(chunk)
    where = f"view {view}, rows {lo}..{hi}"
    for path in ("params", "digest"):
        cache.array(path)[view, lo:hi] = _agreed(plan, plan.shared_from, path, view, lo, hi, where)
    for record in plan.target.teachers:
        for leaf in plan.target.teacher_arrays():
            path = f"{record.name}/{leaf}"
            cache.array(path)[view, lo:hi] = _agreed(plan, plan.teacher_from[record.name], path, view, lo, hi, where)
    cache.array("done")[view, chunk] = 1


def _agreed(plan: _Plan, holders: list[int], path: str, view: int, lo: int, hi: int, where: str) -> np.ndarray:
    blocks = [np.asarray(plan.sources[i].array(path)[view, lo:hi]) for i in holders]
    for i, block in zip(holders[1:], blocks[1:]):
        if not np.array_equal(_bits(block), _bits(blocks[0])):
            raise BuildError(f"{plan.sources[holders[0]].url} and {plan.sources[i].url} disagree on {path} at "
                             f"{where}: they were not built from the same views/teacher; nothing more is copied")
    return blocks[0]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")
