"""Caches made from other caches, without running a teacher: ``merge`` (the teachers and view ranges of two caches
of the same data and build settings) and ``export`` (some teachers and a range of views of one cache, to share).

A cache holds views ``first_view``..``views``-1 (0..E-1 unless it was built with ``--views-from``), always at
their own view index.  ``merge A B`` gives the views from min(first_view) to max(views)-1 and A's teachers, then
B's others; it refuses, before writing anything, caches whose identity differs in anything but the teachers and
the view range (the first field that differs is named), a gap between the two ranges (the missing views are
named) and a teacher that would lack some views.  Views both inputs hold (an overlap; params records, pixel
digests, a teacher in both) are compared bit for bit while copying: the first difference stops the merge naming
the array, view and rows, and the result is never marked complete.  The result is the cache a fresh build with
the final teachers and views would write.

Writing goes through the build's states (creating -> building -> complete) and ``done`` map under the store lease:
a reader of the result sees the "being built" refusal while it is written, an "incomplete, rerun" refusal after a
kill, and the complete cache after the (resumed) command; a killed merge or export resumes where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from cache_builder.errors import BuildError
from cache_builder.store import inspect_out, remove_store
from shared.cache_schema import (STATUS_COMPLETE, STATUS_CREATING, CacheAttrs, LogitCache, create_store,
                                 normalize_url)
from shared.store_lock import StoreLock
from shared.view_spec import ViewSpec


@dataclass
class AssembleSummary:
    url: str
    units_copied: int
    units_skipped: int
    seconds: float
    teachers: list[str]
    views: int
    first_view: int = 0

    def line(self) -> str:
        shown = f"E={self.views}" if not self.first_view else f"views {self.first_view}..{self.views - 1} (a range)"
        return (f"cache {self.url}: complete; {shown}, teachers {', '.join(self.teachers)}; copied "
                f"{self.units_copied} units in {self.seconds:.1f}s; {self.units_skipped} units were already done")


@dataclass
class _Plan:
    target: CacheAttrs
    sources: list[LogitCache]

    def holders(self, view: int, teacher: str | None = None) -> list[int]:
        """The sources holding ``view`` (and ``teacher``): the first is copied, the others compared with it."""
        return [i for i, s in enumerate(self.sources)
                if view in s.attrs.view_range and (teacher is None or teacher in s.teacher_names)]


def merge_caches(a: str, b: str, out: str, *, force: bool = False,
                 storage_options: dict | None = None) -> AssembleSummary:
    """C = A's teachers + B's other teachers over the union of their view ranges (see the module doc)."""
    sa, sb = _open(a, storage_options), _open(b, storage_options)
    diff = sa.attrs.identity_diff(sb.attrs, ignore=("teachers", "views", "first_view"))
    if diff:
        raise BuildError(f"cannot merge {a} and {b}: they differ in {diff[0]}" +
                         (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))
    teachers = list(sa.attrs.teachers)
    names = [t.name for t in teachers]
    for record in sb.attrs.teachers:
        if record.name in names:
            if record.identity() != sa.attrs.teacher(record.name).identity():
                raise BuildError(f"cannot merge {a} and {b}: both have a teacher {record.name!r} but not the same "
                                 "one (checkpoint or settings differ); export one of them without it first")
        else:
            teachers.append(record)
    first, end = min(sa.attrs.first_view, sb.attrs.first_view), max(sa.attrs.views, sb.attrs.views)
    missing = [v for v in range(first, end) if not any(v in s.attrs.view_range for s in (sa, sb))]
    if missing:
        raise BuildError(f"cannot merge {a} (views {_span(sa.attrs.view_range)}) and {b} (views "
                         f"{_span(sb.attrs.view_range)}): views {_span(missing)} are in neither; build them with "
                         f"`cit cache build ... --views-from {missing[0]} --views {missing[-1] + 1}` and merge that "
                         "too")
    for record in teachers:
        lacking = [v for v in range(first, end)
                   if not any(v in s.attrs.view_range and record.name in s.teacher_names for s in (sa, sb))]
        if lacking:
            raise BuildError(f"cannot merge {a} and {b}: every teacher must cover the same views, but teacher "
                             f"{record.name} has no views {_span(lacking)} there; `cit cache extend` or `add-teacher` "
                             "the input that lacks them first")
    target = replace(sa.attrs, teachers=teachers, first_view=first, views=end, growth={}, status=STATUS_CREATING)
    return _assemble(_Plan(target, [sa, sb]), out, force, storage_options)


def export_cache(src: str, out: str, *, teachers: list[str] | None = None, views: int | None = None,
                 first_view: int | None = None, force: bool = False,
                 storage_options: dict | None = None) -> AssembleSummary:
    """A smaller cache: the ``teachers`` named (in that order; default all) and views first_view..views-1 (default
    the source's range); ``first_view`` > 0 makes a view range cache."""
    source = _open(src, storage_options)
    attrs = source.attrs
    names = list(teachers) if teachers else source.teacher_names
    if len(set(names)) != len(names):
        raise BuildError(f"--teachers lists a teacher twice: {names}")
    for name in names:
        if name not in source.teacher_names:
            raise BuildError(f"cache {src} has no teacher {name!r} (it has {source.teacher_names})")
    views = attrs.views if views is None else views
    first_view = attrs.first_view if first_view is None else first_view
    if not attrs.first_view <= first_view < views <= attrs.views:
        raise BuildError(f"--views-from {first_view} --views {views}: cache {src} has views "
                         f"{_span(attrs.view_range)}; export a range F..E-1 inside it")
    target = replace(attrs, teachers=[attrs.teacher(n) for n in names], first_view=first_view, views=views,
                     growth={}, status=STATUS_CREATING)
    return _assemble(_Plan(target, [source]), out, force, storage_options)


# ---------------------------------------------------------------------------------------------------------------

def _open(url: str, storage_options: dict | None) -> LogitCache:
    return LogitCache.open(url, storage_options=storage_options, allow_view_range=True)


def _span(views) -> str:
    views = list(views)
    return f"{views[0]}..{views[-1]}" if len(views) > 1 else str(views[0])


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
        units = [(v, c) for v in target.view_range for c in range(target.num_chunks) if done[v, c] != 1]
        for v, c in units:
            _copy_unit(plan, cache, v, c)
        if not cache.mark_complete():
            raise BuildError(f"cache {out}: some units are missing after the copy; rerun the command")
        return AssembleSummary(out, len(units), target.num_units - len(units), time.perf_counter() - started,
                               [t.name for t in target.teachers], target.views, target.first_view)
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
        create_store(out, target, num_params, storage_options)
    return LogitCache.open(out, "r+", allow_incomplete=True, storage_options=storage_options)


def _copy_unit(plan: _Plan, cache: LogitCache, view: int, chunk: int) -> None:
    """Copy one (view, chunk) unit into every array of the result (comparing duplicates), then mark it done.  Each
    source's blocks are read in one concurrent call and the result's written in one (a round trip each on an
    object store, instead of one per array)."""
    lo, hi = plan.target.chunk_rows_range(chunk)
    paths = ["params", "digest"] + [f"{t.name}/{leaf}" for t in plan.target.teachers for leaf in plan.target.teacher_arrays()]
    holders = {p: plan.holders(view, None if p in ("params", "digest") else p.split("/")[0]) for p in paths}
    read: dict[tuple[int, str], np.ndarray] = {}
    for i, source in enumerate(plan.sources):
        mine = [p for p in paths if i in holders[p]]
        if mine:
            read.update({(i, p): block for p, block in zip(mine, source.read_rows(mine, view, lo, hi))})
    blocks = {p: _agreed(plan, holders[p], p, read, f"view {view}, rows {lo}..{hi}") for p in paths}
    cache.write_rows(blocks, view, lo, hi)
    cache.array("done")[view, chunk] = 1                  # last: a kill before it leaves the unit undone


def _agreed(plan: _Plan, holders: list[int], path: str, read: dict, where: str) -> np.ndarray:
    first = read[holders[0], path]
    for i in holders[1:]:
        if not np.array_equal(_bits(read[i, path]), _bits(first)):
            raise BuildError(f"{plan.sources[holders[0]].url} and {plan.sources[i].url} disagree on {path} at "
                             f"{where}: they were not built from the same views/teacher; nothing more is copied")
    return first


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")
