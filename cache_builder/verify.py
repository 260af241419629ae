"""``cit cache verify``: structure, completeness, fingerprint, content sanity and (optionally) pixel replay and
teacher recompute.

Content checks read one (view, chunk) block at a time (bounded memory, one Zarr call per array per block).
Every chunk carries a crc32c, so a byte-level corruption shows up as an unreadable chunk.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from shared.cache_schema import (STATUS_COMPLETE, STATUS_CREATING, CacheAttrs, expected_arrays, open_root,
                                 read_attrs)
from shared.manifest import Manifest, ManifestError
from shared.view_spec import ViewSpec

MAX_REPORTED = 12


class _Arrays:
    """``root[path]`` with each array opened once (an open costs a metadata round trip on object stores)."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def __getitem__(self, path):
        if path not in self.cache:
            self.cache[path] = self.root[path]
        return self.cache[path]


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    recomputed: int = 0
    _counts: collections.Counter = field(default_factory=collections.Counter, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, kind: str, text: str) -> None:
        self._counts[kind] += 1
        if self._counts[kind] <= MAX_REPORTED:
            self.problems.append(f"{kind}: {text}")
        elif self._counts[kind] == MAX_REPORTED + 1:
            self.problems.append(f"{kind}: (more problems of this kind not listed)")

    def text(self) -> str:
        lines = [f"verify {self.url}: {'OK' if self.ok else f'{len(self.problems)} PROBLEM(S)'}"]
        lines += [f"  ok      {p}" for p in self.passed]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        return "\n".join(lines)


def verify_cache(url: str, data: str | None = None, recompute: int = 0, teachers: dict | list | None = None,
                 storage_options: dict | None = None, device: str = "auto", batch_size: int = 64,
                 seed: int = 0, pixels: bool = False, sample: int = 0) -> VerifyReport:
    """Check the cache at ``url``; ``data`` is the manifest it should have been built from.  ``recompute`` > 0 re-runs
    the teachers (checkpoints from ``teachers`` NAME->PATH, else the paths recorded at build time) on that many
    random stored views and compares.  ``pixels`` re-renders every stored view (``sample`` > 0: that many random
    ones) from the shards and checks its params record and pixel digest — no teacher needed.  Returns a report;
    never raises for a problem it can name."""
    report = VerifyReport(url)
    try:
        root = open_root(url, "r", storage_options)
        attrs = read_attrs(root, url)
    except Exception as exc:  # noqa: BLE001
        report.problem("structure", f"cannot open as a cit cache: {exc}")
        return report
    from shared.store_lock import active_lease
    lease = active_lease(url, storage_options) if attrs.status != STATUS_COMPLETE else None
    if lease is not None:
        report.problem("complete", f"the cache is being built by {lease.holder()} (not finished yet)")
        return report
    if attrs.status == STATUS_CREATING:
        report.problem("complete", "the cache was interrupted while being created (no data yet)")
        return report
    if attrs.growth:
        report.problem("complete", f"a change ({attrs.growth.get('op')}) is under way or was interrupted; readers see "
                       "the complete cache it started from — rerun that command to finish it, then verify")
        return report
    spec = ViewSpec.from_dict(attrs.augment)
    root = _Arrays(root)
    if not _check_structure(root, attrs, spec, report):
        return report
    done = np.asarray(root["done"][:])
    _check_complete(attrs, done, report)
    manifest = None
    if data:
        manifest = _check_fingerprint(attrs, data, report)
    _check_content(root, attrs, spec, done, report)
    if pixels:
        if manifest is None:
            report.problem("pixels", "--pixels needs --data (the manifest to re-render the views from)")
        else:
            _check_pixels(root, attrs, spec, manifest, done, sample, seed, report)
    if recompute > 0:
        if manifest is None:
            report.problem("recompute", "--recompute needs --data (the manifest to rebuild the views from)")
        else:
            _recompute(root, attrs, spec, manifest, done, recompute, teachers, device, batch_size, seed, report)
    return report


def _check_structure(root, attrs: CacheAttrs, spec: ViewSpec, report: VerifyReport) -> bool:
    ok = True
    for path, (shape, chunks, dtype) in expected_arrays(attrs, spec.num_params).items():
        try:
            array = root[path]
        except KeyError:
            report.problem("structure", f"array {path} is missing")
            ok = False
            continue
        if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype or tuple(array.chunks) != chunks:
            report.problem("structure", f"array {path} is {array.dtype} {tuple(array.shape)} chunks "
                           f"{tuple(array.chunks)}, the layout says {dtype} {shape} chunks {chunks}")
            ok = False
    if ok:
        report.passed.append(f"structure: {len(expected_arrays(attrs, spec.num_params))} arrays with the expected "
                             f"shapes, dtypes and chunks (E={attrs.views}, N={attrs.num_samples}, K={attrs.topk}, "
                             f"teachers {[t.name for t in attrs.teachers]})")
    return ok


def _check_complete(attrs: CacheAttrs, done: np.ndarray, report: VerifyReport) -> None:
    n_done = int((done == 1).sum())
    if attrs.status != STATUS_COMPLETE:
        report.problem("complete", f"status is {attrs.status!r}: {n_done} of {attrs.num_units} units written "
                       "(rerun the same `cit cache build` command to finish it)")
    elif n_done != attrs.num_units:
        report.problem("complete", f"marked complete but only {n_done} of {attrs.num_units} units are done")
    else:
        report.passed.append(f"complete: all {attrs.num_units} units written")


def _check_fingerprint(attrs: CacheAttrs, data: str, report: VerifyReport) -> Manifest | None:
    try:
        manifest = Manifest.load(data)
    except ManifestError as exc:
        report.problem("fingerprint", str(exc))
        return None
    if manifest.fingerprint != attrs.dataset_fingerprint:
        report.problem("fingerprint", f"the cache was built from other data: its fingerprint "
                       f"{attrs.dataset_fingerprint[:16]}… != {data}'s {manifest.fingerprint[:16]}…")
        return None
    if manifest.num_samples != attrs.num_samples or manifest.num_classes != attrs.num_classes:
        report.problem("fingerprint", f"N/C mismatch: cache {attrs.num_samples}/{attrs.num_classes}, manifest "
                       f"{manifest.num_samples}/{manifest.num_classes}")
        return None
    report.passed.append(f"fingerprint matches {data}")
    return manifest


def _check_content(root, attrs: CacheAttrs, spec: ViewSpec, done: np.ndarray, report: VerifyReport) -> None:
    c = attrs.num_classes
    before = len(report.problems)
    checked = 0
    for v in range(attrs.views):
        for chunk in range(attrs.num_chunks):
            if done[v, chunk] != 1:
                continue
            lo, hi = attrs.chunk_rows_range(chunk)
            where = f"view {v}, rows {lo}..{hi} (chunk {chunk})"
            try:
                params = np.asarray(root["params"][v, lo:hi])
            except Exception as exc:  # noqa: BLE001 — a corrupted chunk fails its crc32c or its decompression
                report.problem("unreadable", f"params {where}: {exc}")
                params = None
            if params is not None and not np.isfinite(params).all():
                report.problem("nonfinite", f"params {where} holds NaN/Inf (unwritten rows?)")
            for t in attrs.teachers:
                try:
                    logp = np.asarray(root[f"{t.name}/logp"][v, lo:hi]).astype(np.float32)
                    indices = np.asarray(root[f"{t.name}/indices"][v, lo:hi]).astype(np.int64)
                    tail = np.asarray(root[f"{t.name}/tail"][v, lo:hi]).astype(np.float32)
                except Exception as exc:  # noqa: BLE001
                    report.problem("unreadable", f"teacher {t.name} {where}: {exc}")
                    continue
                _check_block(t.name, where, logp, indices, tail, attrs, report)
            checked += 1
    if len(report.problems) == before:
        report.passed.append(f"content: {checked} units finite, indices in [0, {c}) and distinct, log-probabilities "
                             "sorted descending, tail log-masses <= 0 and growing with τ, top-k + tail mass = 1")


def _check_block(name, where, logp, indices, tail, attrs: CacheAttrs, report) -> None:
    c, k = attrs.num_classes, attrs.topk
    if not np.isfinite(logp).all() or np.isnan(tail).any():
        rows = np.flatnonzero(~(np.isfinite(logp).all(axis=1) & ~np.isnan(tail).any(axis=1)))
        report.problem("nonfinite", f"teacher {name} {where}: NaN/Inf in {len(rows)} rows (first row offset "
                       f"{rows[0]})")
        return
    if indices.min(initial=0) < 0 or indices.max(initial=0) >= c:
        report.problem("indices", f"teacher {name} {where}: class indices outside [0, {c})")
    srt = np.sort(indices, axis=1)
    if k > 1 and (srt[:, 1:] == srt[:, :-1]).any():
        report.problem("indices", f"teacher {name} {where}: a row repeats a class index")
    if k > 1 and (np.diff(logp, axis=1) > 0).any():
        rows = np.flatnonzero((np.diff(logp, axis=1) > 0).any(axis=1))
        report.problem("sorted", f"teacher {name} {where}: top-k log-probabilities not sorted descending in "
                       f"{len(rows)} rows (first row offset {rows[0]})")
    if (logp > 0).any() or (tail > 0).any():
        report.problem("mass", f"teacher {name} {where}: a log-probability or tail log-mass is above 0")
    if tail.shape[1] > 1 and (np.diff(tail, axis=1) < -2e-3 * np.maximum(1.0, np.abs(tail[:, 1:]))).any():
        report.problem("mass", f"teacher {name} {where}: tail mass shrinks as τ grows (impossible for a top-k)")
    if 1.0 in attrs.temperatures:     # at τ = 1 the top-k and tail masses must add up to 1
        total = np.exp(logp).sum(axis=1) + np.exp(tail[:, attrs.temperatures.index(1.0)])
        if (np.abs(total - 1.0) > 5e-3).any():
            report.problem("mass", f"teacher {name} {where}: top-k + tail mass at τ=1 is not 1 (worst "
                           f"{total[np.argmax(np.abs(total - 1.0))]:.4f})")


def pick_views(attrs: CacheAttrs, done: np.ndarray, m: int, seed: int) -> list[tuple[int, int]]:
    """``m`` random distinct (view, row) among written units, deterministic in ``seed``, sorted by row."""
    rng = np.random.default_rng(seed)
    units = np.argwhere(done == 1)
    picks: set = set()
    tries = 0
    short = attrs.num_chunks * attrs.chunk_rows - attrs.num_samples          # rows the last chunk lacks
    capacity = len(units) * attrs.chunk_rows - short * int((units[:, 1] == attrs.num_chunks - 1).sum())
    while len(units) and len(picks) < min(m, capacity) and tries < 100 * m:
        v, chunk = units[rng.integers(len(units))]
        lo, hi = attrs.chunk_rows_range(int(chunk))
        picks.add((int(v), int(rng.integers(lo, hi))))
        tries += 1
    return sorted(picks, key=lambda p: (p[1], p[0]))


def _check_pixels(root, attrs: CacheAttrs, spec: ViewSpec, manifest: Manifest, done: np.ndarray, sample: int,
                  seed: int, report: VerifyReport) -> None:
    """Re-render stored views through the shared renderer; compare params records and pixel digests."""
    from cache_builder.streams import read_scattered_rows
    from shared.views import VIEW_CODE, LoadedRows, make_renderer, view_mismatch
    if attrs.view_code != VIEW_CODE:
        report.problem("pixels", f"the views were rendered by view code {attrs.view_code or 'of an older cit'}, "
                       f"this cit renders {VIEW_CODE}: rebuild the cache")
        return
    renderer = make_renderer(spec, attrs.seed, manifest)
    if sample > 0:
        picks = pick_views(attrs, done, sample, seed)
    else:
        picks = [(v, row) for row in range(attrs.num_samples) for v in range(attrs.views)
                 if done[v, row // attrs.chunk_rows] == 1]
    by_chunk: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for v, row in picks:
        by_chunk[row // attrs.chunk_rows].append((v, row))
    bad = 0
    for chunk, chunk_picks in sorted(by_chunk.items()):
        lo, hi = attrs.chunk_rows_range(chunk)
        wanted = sorted({r for _, row in chunk_picks for r in range(*renderer.rows_to_load(row, row + 1))})
        rows = LoadedRows(list(read_scattered_rows(manifest, wanted).values()), keep_images=True)
        stored = {}
        for v in sorted({v for v, _ in chunk_picks}):
            stored[v] = (np.asarray(root["params"][v, lo:hi]), np.asarray(root["digest"][v, lo:hi]))
        for v, row in chunk_picks:
            params, digests = stored[v]
            problem = view_mismatch(v, rows.raw(row), renderer.render(v, rows, row), params[row - lo],
                                    digests[row - lo])
            if problem:
                bad += 1
                report.problem("pixels", problem)
    if bad == 0:
        report.passed.append(f"pixels: {len(picks)} {'random ' if sample > 0 else ''}views re-rendered from the "
                             "shards: params records and pixel digests match")


def _recompute(root, attrs: CacheAttrs, spec: ViewSpec, manifest: Manifest, done: np.ndarray, m: int, teachers,
               device: str, batch_size: int, seed: int, report: VerifyReport) -> None:
    import torch

    from cache_builder.errors import BuildError
    from cache_builder.streams import ReplayedViews
    from cache_builder.teachers import TeacherRunner, load_recorded_teachers, parse_teacher_args, resolve_device
    from shared.features import decode_features
    from shared.targets import encode_logits
    overrides = dict(parse_teacher_args(teachers)) if teachers else {}
    pairs = []
    for t in attrs.teachers:
        path = overrides.get(t.name) or t.extra.get("checkpoint")
        if not path:
            report.problem("recompute", f"no checkpoint for teacher {t.name}: pass --teacher {t.name}=PATH")
            return
        pairs.append((t.name, path))
    dev = resolve_device(device)
    try:
        loaded = load_recorded_teachers(attrs, pairs, dev)
    except BuildError as exc:
        report.problem("recompute", str(exc))
        return
    precision = attrs.build.get("precision", "fp32")
    if precision == "bf16" and dev.type != "cuda":
        precision = "fp32"     # compare with the looser bf16 tolerance below
    try:
        runner = TeacherRunner(loaded, dev, precision, attrs.topk, tuple(attrs.temperatures), attrs.features)
    except BuildError as exc:
        report.problem("recompute", str(exc))
        return
    picks = pick_views(attrs, done, m, seed)
    if not picks:
        report.problem("recompute", "no written units to recompute")
        return
    replay = ReplayedViews(manifest, spec, attrs.seed, picks)
    k, c = attrs.topk, attrs.num_classes
    loose = attrs.build.get("precision") == "bf16"
    rtol, atol = (5e-2, 5e-2) if loose else (4e-3, 4e-3)
    blocks: dict = {}

    def stored(path: str, v: int, row: int):
        """Row ``row`` of view ``v`` of array ``path``, read one (view, chunk) block at a time."""
        chunk = row // attrs.chunk_rows
        key = (path, v, chunk)
        if key not in blocks:
            if len(blocks) > 256:        # picks are sorted by row: old blocks are not needed again
                blocks.clear()
            lo, hi = attrs.chunk_rows_range(chunk)
            blocks[key] = np.asarray(root[path][v, lo:hi])
        return blocks[key][row - chunk * attrs.chunk_rows]

    mismatches = 0
    for a in range(0, len(picks), batch_size):
        batch = picks[a:a + batch_size]
        tensors = []
        for v, row in batch:
            view, record = replay.render(v, row)
            if not np.array_equal(stored("params", v, row).view(np.uint32), record.view(np.uint32)):
                report.problem("recompute", f"view {v} of {replay.raws[row].key!r} (row {row}): stored params "
                               "differ from the replayed view's")
                mismatches += 1
            tensors.append(view)
        views = torch.stack(tensors).to(dev)
        with torch.inference_mode():
            for t in loaded:
                if attrs.features:
                    logits, pooled = runner.logits_and_pooled(t, views)
                    pooled = pooled.cpu().numpy()
                else:
                    logits = runner.logits(t, views)
                ref_logp, _, ref_tail = encode_logits(logits, k, attrs.temperatures)
                ref_logp, ref_tail = ref_logp.cpu().numpy(), ref_tail.cpu().numpy()
                kk = min(k + 1, c)
                top_v, top_i = torch.topk(logits, kk, dim=1)
                top_v, top_i = top_v.cpu().numpy(), top_i.cpu().numpy()
                for j, (v, row) in enumerate(batch):
                    sv = stored(f"{t.name}/logp", v, row).astype(np.float32)
                    si = stored(f"{t.name}/indices", v, row).astype(np.int64)
                    st = stored(f"{t.name}/tail", v, row).astype(np.float32)
                    bad = []
                    if not np.allclose(sv, ref_logp[j], rtol=rtol, atol=atol):
                        bad.append(f"log-probabilities differ by up to {np.abs(sv - ref_logp[j]).max():.4g}")
                    mass_error = np.abs(np.exp(st) - np.exp(ref_tail[j]))
                    if (mass_error > atol).any():
                        worst = int(np.argmax(mass_error))
                        bad.append(f"tail mass at τ={attrs.temperatures[worst]:g} is {np.exp(st[worst]):.5g}, the "
                                   f"teacher's {np.exp(ref_tail[j, worst]):.5g}")
                    # indices must agree wherever the rank is not a near-tie (ties may order either way)
                    gaps = np.abs(np.diff(top_v[j]))
                    tol = atol + rtol * np.abs(top_v[j])
                    for pos in range(k):
                        tied = (pos > 0 and gaps[pos - 1] <= tol[pos]) or (pos < kk - 1 and gaps[pos] <= tol[pos])
                        if not tied and si[pos] != top_i[j, pos]:
                            bad.append(f"class at rank {pos} is {si[pos]}, the teacher says {top_i[j, pos]}")
                            break
                    if attrs.features:    # stored codes: within half a step of the live features (+ precision)
                        scale = stored(f"{t.name}/feature_scale", v, row)
                        got = decode_features(stored(f"{t.name}/features", v, row), scale)
                        off = np.abs(got - pooled[j]) - scale[1] / 2 * 1.001
                        if (off > atol + rtol * np.abs(pooled[j])).any():
                            bad.append(f"pooled features differ by up to {np.abs(got - pooled[j]).max():.4g} "
                                       f"(stored step {scale[1]:.3g})")
                    if bad:
                        mismatches += 1
                        key = replay.raws[row].key
                        report.problem("recompute", f"teacher {t.name}, view {v} of {key!r} (row {row}): "
                                       + "; ".join(bad))
    report.recomputed = len(picks)
    if mismatches == 0:
        report.passed.append(f"recompute: {len(picks)} random views re-rendered and re-run through "
                             f"{[t.name for t in loaded]}: params identical, top-k log-probabilities and tail masses "
                             + ("and pooled features " if attrs.features else "") + "match")
