"""Stage 1: run every teacher over E replayable views of every sample and store its exact top-k targets in Zarr.

Work unit = (view, row chunk), one Zarr chunk in every array.  The pipeline of one process (rank):

    pending units (done map) --split--> this rank's units, grouped by chunk
    DataLoader workers: read the chunk's rows (one sequential pass over its shard(s)), then per fixed batch of
        rows: decode once, render every pending view of the chunk (``shared.views`` renderer) -> uint8 views,
        params records and pixel digests
    main process: uint8 batch -> device (pinned, non_blocking) -> each teacher (eval, inference mode, its own
        normalisation, bf16 autocast on CUDA only) -> top-k log-probs + tail log-mass per cached τ, fp32 on the
        device from the full logits (``shared.targets.encode_logits``) -> one packed tensor ->
        one device->host copy (pinned, non_blocking, event; no host sync in the loop)
    writer thread: waits on the batch's event, checks finiteness (error names teacher and sample key), assembles
        the unit, ``LogitCache.write_unit`` (data chunks first, ``done`` last)

Bit-exactness: a unit's rows are cut into batches ``[lo + b*B, lo + (b+1)*B)`` — fixed by (chunk, batch size),
never by resume point, rank or worker count — and ``batch_size``/precision are part of the cache identity, so a
resumed or multi-process build computes every unit exactly as an uninterrupted single-process build does.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cache_builder.errors import BuildError
from cache_builder.plan import group_units, plan_build, rank_share
from cache_builder.runner import _run_units, write_whole_unit
from cache_builder.session import StoreSession
from cache_builder.store import _remove_partial_writes, check_out_reachable, inspect_out, remove_store
from cache_builder.streams import (check_shards_readable, check_teacher_channels, default_chunk_rows,
                                   measure_accuracy, open_test_set, read_rows, record_accuracy, render_rows)
from cache_builder.teachers import TeacherRunner, load_teachers, parse_teacher_args, resolve_device, resolve_precision
from shared import provenance
from shared.augment import ViewSpec
from shared.cache_schema import (STATUS_BUILDING, STATUS_COMPLETE, STATUS_CREATING, CacheAttrs, LogitCache,
                                 create_store, normalize_url, open_root)
from shared.features import FEATURE_KINDS
from shared.manifest import Manifest, ManifestError
from shared.store_lock import StoreLock
from shared.views import VIEW_CODE, LoadedRows, make_renderer

log = logging.getLogger(__name__)


def parse_temperatures(items) -> tuple[float, ...]:
    """``"1,2,4"`` or a sequence -> sorted distinct positive temperatures (the tail mass is stored at each)."""
    parts = items.split(",") if isinstance(items, str) else list(items)
    try:
        values = sorted({float(x) for x in parts if str(x).strip()})
    except ValueError:
        raise BuildError(f"--temperatures {items!r} must be a comma-separated list of numbers, e.g. 1,2,4") from None
    if not values or values[0] <= 0 or not all(np.isfinite(values)):
        raise BuildError(f"--temperatures {items!r} must list positive temperatures, e.g. 1,2,4")
    return tuple(values)


def default_cpu_threads(workers: int) -> int:
    """A new CPU cache's intra-op threads: the cores the render workers leave to the teachers (chosen by
    measurement on 2 cores: 1 thread + 1 worker reached 0.98x the teachers' in-memory inference, 2 threads + 1 worker
    0.84x — the teachers' second thread and the worker fought for one core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - workers))


@dataclass
class BuildSummary:
    url: str
    complete: bool
    views_built: int               # (sample, view) pairs run through every teacher in this call (all ranks)
    units_built: int
    units_skipped: int             # already done before this call
    seconds: float                 # the whole call: checks, accuracy, store creation, the units
    teachers: dict[str, float | None] = field(default_factory=dict)   # name -> test accuracy
    build_seconds: float = 0.0     # the units alone (rank 0's loop: data, teachers, writes), the steady state

    @property
    def steady_views_per_second(self) -> float:
        """Views/s of the unit loop (what a long build converges to)."""
        return self.views_built / self.build_seconds if self.build_seconds > 0 else float("nan")

    @property
    def views_per_second(self) -> float:
        return self.views_built / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        acc = ", ".join(f"{k} acc={'n/a' if v is None else f'{v:.4f}'}" for k, v in self.teachers.items())
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"cache {self.url}: {state}; built {self.units_built} units ({self.views_built} views) in "
                f"{self.seconds:.1f}s = {self.views_per_second:.1f} views/s; {self.units_skipped} units were "
                f"already done; teachers: {acc}")


@dataclass
class BuildSettings:
    """Everything ``cit cache build`` is told (the CLI fills it; ``build_cache`` takes the same as keywords)."""
    data: str                                   # training manifest
    teachers: list = field(default_factory=list)   # ["NAME=CHECKPOINT", ...] or {name: path}
    out: str = ""
    views: int = 1
    first_view: int = 0                         # build views first_view..views-1 only (a view range)
    topk: int = 10
    spec: ViewSpec | dict | None = None
    temperatures: tuple[float, ...] | list[float] | str = (1.0,)
    seed: int = 0
    batch_size: int = 256
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    chunk_rows: int | None = None
    threads: int | None = None
    test_data: str | None = None
    min_teacher_acc: float | None = None
    force: bool = False
    verify_shards: bool = True
    storage_options: dict | None = None
    progress: bool = True
    features: str = ""                          # "pooled": store each teacher's pooled features too


def build_cache(data: "str | BuildSettings", teachers=None, out: str = "", **options) -> BuildSummary:
    """Build (or resume) the logit cache at ``out``; ``options`` are the fields of ``BuildSettings`` (or pass one
    ``BuildSettings``, as the CLI does)."""
    settings = data if isinstance(data, BuildSettings) else BuildSettings(data, teachers, out, **options)
    return run_build(settings)


def run_build(settings: BuildSettings) -> BuildSummary:
    """Build (or resume) the cache ``settings.out``; see the module doc.  Safe to call under torchrun."""
    started = time.perf_counter()
    b = settings
    data, teachers, out, views, topk, spec, temperatures, seed = (b.data, b.teachers, b.out, b.views, b.topk,
                                                                  b.spec, b.temperatures, b.seed)
    batch_size, workers, device, precision, chunk_rows, threads = (b.batch_size, b.workers, b.device, b.precision,
                                                                   b.chunk_rows, b.threads)
    test_data, min_teacher_acc, storage_options, progress = b.test_data, b.min_teacher_acc, b.storage_options, \
        b.progress
    spec = spec if isinstance(spec, ViewSpec) else ViewSpec.from_dict(spec or {})
    if views < 1:
        raise BuildError(f"--views must be >= 1, got {views}")
    if not 0 <= b.first_view < views:
        raise BuildError(f"--views-from {b.first_view} must be in 0..{views - 1} (the range is views-from..views-1)")
    if topk < 1:
        raise BuildError(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise BuildError(f"--batch-size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise BuildError(f"--threads must be >= 1, got {threads}")
    if min_teacher_acc is not None and not 0 <= min_teacher_acc <= 1:
        raise BuildError(f"--min-teacher-acc is a fraction in [0, 1], got {min_teacher_acc}")
    if min_teacher_acc is not None and not test_data:
        raise BuildError("--min-teacher-acc needs --test-data to measure the teachers on")
    temperatures = parse_temperatures(temperatures)
    features = b.features or ""
    if features and features not in FEATURE_KINDS:
        raise BuildError(f"--features {features!r}: the cache can store {' or '.join(FEATURE_KINDS)} features")
    pairs = parse_teacher_args(teachers)
    dev = resolve_device(device)
    if workers is None:   # CPU: one worker renders ~25x faster than a teacher infers; GPU: keep the device fed
        workers = 1 if dev.type == "cpu" else min(8, os.cpu_count() or 1)
    try:
        manifest = Manifest.load(data)
    except ManifestError as exc:
        raise BuildError(str(exc)) from None
    if manifest.num_samples == 0:
        raise BuildError(f"manifest {data} lists no samples")
    if topk > manifest.num_classes:
        raise BuildError(f"--topk {topk} is larger than the number of classes ({manifest.num_classes}) of {data}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    precision = resolve_precision(precision, dev)
    chunk_rows = chunk_rows or default_chunk_rows(manifest)
    if chunk_rows < 1:
        raise BuildError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    loaded = load_teachers(pairs, manifest.num_classes, dev, view_size=spec.image_size)
    runner = TeacherRunner(loaded, dev, precision, topk, temperatures, features)
    intended = CacheAttrs(dataset_fingerprint=manifest.fingerprint, num_samples=manifest.num_samples,
                          num_classes=manifest.num_classes, views=views, first_view=b.first_view, topk=topk,
                          seed=seed,
                          augment=spec.to_dict(), chunk_rows=chunk_rows, teachers=[t.record for t in loaded],
                          status=STATUS_CREATING,
                          build={"batch_size": batch_size, "precision": precision, "device": dev.type,
                                 "cpu_threads": threads if dev.type == "cpu" else None},
                          temperatures=list(temperatures), features=features,
                          view_code=dict(VIEW_CODE), provenance=provenance.collect(dev.type))

    with StoreSession() as session:
        comm = session.comm
        # ---- rank 0: every check that can fail, then create or reopen the store; the others wait for its verdict
        error, attrs_json = None, None
        if comm.rank == 0:
            try:
                check_out_reachable(out, storage_options)
                session.lock = StoreLock(normalize_url(out), storage_options).acquire()   # one writer per store
                attrs = _prepare(replace(settings, spec=spec, workers=workers), manifest, loaded, runner, intended)
                attrs_json = attrs.to_json_dict()
            except Exception as exc:  # noqa: BLE001 — re-raised below after telling the other ranks
                error = exc
        verdict = comm.broadcast((None if error is None else f"{type(error).__name__}: {error}", attrs_json))
        if error is not None:
            raise error
        if verdict[0] is not None:
            raise BuildError(f"rank 0 refused the build: {verdict[0]}")
        attrs = CacheAttrs.from_json_dict(verdict[1])
        if attrs.build.get("cpu_threads") and dev.type == "cpu":
            torch.set_num_threads(int(attrs.build["cpu_threads"]))

        cache = LogitCache.open(out, "r+", allow_incomplete=True, storage_options=storage_options)
        done = cache.done_map()
        comm.barrier()                    # everyone has read the same done map before anyone writes
        pending = [(c, v) for c in range(attrs.num_chunks) for v in range(views) if done[v, c] != 1]
        skipped = attrs.num_units - len(pending)
        mine = rank_share(pending, comm.rank, comm.world)
        groups = group_units(mine)

        failed, built_views, built_units = 0, 0, 0
        loop_started = time.perf_counter()
        try:
            built_units, built_views = _run_units(write_whole_unit(cache), runner, manifest, spec, seed, attrs,
                                                  groups, batch_size, workers, progress and comm.rank == 0)
        except BaseException:
            failed = 1
            raise
        finally:
            failed = comm.sum(failed)
            built_units, built_views = comm.sum(built_units), comm.sum(built_views)
            complete = False
            if comm.rank == 0 and not failed:
                complete = cache.mark_complete()
            complete = bool(comm.broadcast(complete))
        now = time.perf_counter()
        summary = BuildSummary(out, complete, built_views, built_units, skipped, now - started,
                               {t.name: t.test_accuracy for t in attrs.teachers}, now - loop_started)
        if failed:
            raise BuildError(f"another rank failed; cache {out} is left incomplete (rerun to resume)")
        return summary


def _prepare(settings: BuildSettings, manifest, loaded, runner, intended: CacheAttrs) -> CacheAttrs:
    """All refusals happen here, before anything is written; returns the attrs of the (created or resumed) cache."""
    s = settings
    spec, seed, out, test_data, min_teacher_acc, force = s.spec, s.seed, s.out, s.test_data, s.min_teacher_acc, s.force
    verify, storage_options, batch_size, workers, progress = (s.verify_shards, s.storage_options, s.batch_size,
                                                              s.workers, s.progress)
    check_shards_readable(manifest, verify)
    check_teacher_channels(loaded, manifest)
    state, existing = inspect_out(out, storage_options)
    if intended.build["device"] == "cpu" and intended.build["cpu_threads"] is None:
        # CPU kernels (oneDNN) may round differently with another intra-op thread count: the count is pinned per
        # cache — a resume (or another rank) uses the stored one, a new cache this process's
        stored = existing.build.get("cpu_threads") if state == "cache" and not force else None
        intended.build["cpu_threads"] = int(stored or default_cpu_threads(workers))
    plan = plan_build(state, existing, intended, force, out)
    if plan.action == "refuse":
        raise BuildError(plan.reason)
    if intended.build["cpu_threads"]:
        torch.set_num_threads(intended.build["cpu_threads"])
    resume = plan.action == "resume"
    if resume and existing.status == STATUS_COMPLETE:
        log.info("cache %s is already complete", out)
    _probe(runner, manifest, spec, seed, intended.chunk_rows)

    # teacher accuracy: measured once per cache; reused on resume when measured on the same test set
    records = [replace(r) for r in intended.teachers]
    test_fp = None
    if test_data:
        test = open_test_set(test_data, manifest)
        test_fp = test.fingerprint
        stored = {t.name: t for t in existing.teachers} if resume else {}
        reuse = all(stored.get(r.name) is not None and stored[r.name].test_accuracy is not None
                    and stored[r.name].extra.get("test_fingerprint") == test_fp for r in records)
        if reuse:
            acc = {r.name: stored[r.name].test_accuracy for r in records}
        else:
            check_shards_readable(test, verify)
            acc = measure_accuracy(runner, test, spec, batch_size, workers, progress)
        record_accuracy(records, acc, test)
        if min_teacher_acc is not None:
            low = [f"{r.name}={r.test_accuracy:.4f}" for r in records if r.test_accuracy < min_teacher_acc]
            if low:
                raise BuildError(f"teacher accuracy below --min-teacher-acc {min_teacher_acc} on {test_data}: "
                                 f"{', '.join(low)} (check the checkpoint and its input normalisation)")
    elif resume:   # keep what an earlier run measured
        stored = {t.name: t for t in existing.teachers}
        for r in records:
            r.test_accuracy = stored[r.name].test_accuracy
            r.extra = {**stored[r.name].extra, **r.extra}

    num_params = spec.num_params
    if resume:
        _remove_partial_writes(out)
    if resume and existing.status != STATUS_CREATING:
        attrs = replace(existing, teachers=records)
        root = open_root(out, "r+", storage_options)
        if [r.__dict__ for r in records] != [t.__dict__ for t in existing.teachers]:
            root.attrs.put(attrs.to_json_dict())
        return attrs
    if plan.action == "replace":                           # --force: replace whatever cache is there
        log.warning("--force: replacing the cache at %s", out)
        remove_store(out, storage_options)
    attrs = replace(intended, teachers=records, status=STATUS_BUILDING)
    create_store(out, attrs, num_params, storage_options, mode="a" if resume else "w")
    return attrs


def _probe(runner: TeacherRunner, manifest: Manifest, spec: ViewSpec, seed: int, chunk_rows: int) -> None:
    """Run every teacher on a few real views before anything is written: shapes and finiteness."""
    n = min(8, manifest.num_samples, chunk_rows)
    renderer = make_renderer(spec, seed, manifest)
    samples = read_rows(manifest, *renderer.rows_to_load(0, n))
    views = render_rows(renderer, 0, LoadedRows(samples), 0, n)[0].to(runner.device)
    keys = [r.key for r in samples[:n]]
    with torch.inference_mode():
        for teacher in runner.teachers:
            try:
                logits = runner.logits(teacher, views)
            except RuntimeError as exc:
                raise BuildError(f"teacher {teacher.name} ({teacher.checkpoint}) fails on the views "
                                 f"{tuple(views.shape[1:])} of {manifest.path}: {exc}") from None
            if logits.ndim != 2 or logits.shape[1] != manifest.num_classes:
                raise BuildError(f"teacher {teacher.name} returns logits of shape {tuple(logits.shape)}, expected "
                                 f"(batch, {manifest.num_classes})")
            ok = torch.isfinite(logits).all(dim=1).cpu().numpy()
            if not ok.all():
                raise BuildError(f"teacher {teacher.name} produced non-finite logits (NaN/Inf) on sample "
                                 f"{keys[int(np.argmin(ok))]!r} (view 0) before the build started; nothing written")
            if runner.features:
                _probe_features(runner, teacher, views, logits, keys)


def _probe_features(runner: TeacherRunner, teacher, views: torch.Tensor, logits: torch.Tensor,
                    keys: list[str]) -> None:
    """The pooled features of the probe views: (n, feature_dim), finite, and the logits beside them those of
    ``model(x)`` (one ``forward_features`` pass gives both only for a timm-style ``forward``)."""
    try:
        one_pass, pooled = runner.logits_and_pooled(teacher, views)
    except (RuntimeError, TypeError) as exc:
        raise BuildError(f"teacher {teacher.name} ({teacher.checkpoint}): cannot compute its pooled features "
                         f"(forward_head(forward_features(x), pre_logits=True)): {exc}") from None
    dim = teacher.record.feature_dim
    if pooled.ndim != 2 or pooled.shape[1] != dim:
        raise BuildError(f"teacher {teacher.name}: pooled features of shape {tuple(pooled.shape)}, expected "
                         f"(batch, {dim}) (its num_features)")
    if not torch.equal(one_pass, logits):
        raise BuildError(f"teacher {teacher.name}: forward_head(forward_features(x)) is not its forward(x), so its "
                         "features and logits cannot come from one pass; build without --features")
    ok = torch.isfinite(pooled).all(dim=1).cpu().numpy()
    if not ok.all():
        raise BuildError(f"teacher {teacher.name} produced non-finite features (NaN/Inf) on sample "
                         f"{keys[int(np.argmin(ok))]!r} (view 0) before the build started; nothing written")
