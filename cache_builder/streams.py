"""The data of a build: a unit's rows read in one pass over its shard(s), decoded once, rendered for every
pending view in DataLoader workers (``UnitStream``); the eval views of a test set (``EvalStream``) and the teachers'
accuracy on them."""
from __future__ import annotations

import collections
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cache_builder.errors import BuildError
from cache_builder.teachers import TeacherRunner
from shared.augment import ViewSpec
from shared.manifest import Manifest, ManifestError, check_shards
from shared.reader import RawSample, pieces_for_rows, read_piece, seed_worker
from shared.shards import ShardError
from shared.views import LoadedRows, PlainRenderer, make_renderer, render_eval

MAX_DEFAULT_CHUNK_ROWS = 4096


def default_chunk_rows(manifest: Manifest) -> int:
    counts = collections.Counter(s.samples for s in manifest.shards if s.samples > 0)
    if not counts:
        return 1
    common = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return max(1, min(common, MAX_DEFAULT_CHUNK_ROWS))


def read_rows(manifest: Manifest, lo: int, hi: int) -> list[RawSample]:
    samples = []
    for piece in pieces_for_rows(manifest, lo, hi):
        samples.extend(read_piece(manifest, piece))
    if len(samples) != hi - lo:
        raise ShardError(f"rows {lo}..{hi} of {manifest.path}: read {len(samples)} samples, expected {hi - lo}")
    return samples


def read_scattered_rows(manifest: Manifest, rows: list[int]) -> dict[int, RawSample]:
    """Rows -> RawSample, one read per shard touched (from its first wanted row to its last)."""
    by_shard: dict[int, list[int]] = collections.defaultdict(list)
    for row in rows:
        by_shard[manifest.shard_of_row(row)].append(row)
    out = {}
    for shard_rows in by_shard.values():
        for piece in pieces_for_rows(manifest, min(shard_rows), max(shard_rows) + 1):
            for raw in read_piece(manifest, piece):
                out[raw.row] = raw
    return {row: out[row] for row in rows}


class ReplayedViews:
    """Picked (view, row) pairs of a cache rendered again by the builder's renderer (``verify --recompute``,
    ``--fidelity``): the rows and, with exact mixing, their partners' pairing windows are read once."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, seed: int, picks: list[tuple[int, int]]):
        self.renderer = make_renderer(spec, seed, manifest)
        self.ranges = {row: self.renderer.rows_to_load(row, row + 1) for _, row in picks}
        self.raws = read_scattered_rows(manifest, sorted({r for lo, hi in self.ranges.values() for r in range(lo, hi)}))

    def render(self, view: int, row: int) -> tuple[torch.Tensor, np.ndarray]:
        """The uint8 view tensor (C, H, W) and its params record."""
        lo, hi = self.ranges[row]
        tensors, records, _ = render_rows(self.renderer, view, LoadedRows([self.raws[r] for r in range(lo, hi)]),
                                          row, row + 1)
        return tensors[0], records[0]


def batch_bounds(lo: int, hi: int, batch_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)]


def chunk_read_range(manifest: Manifest, spec: ViewSpec, lo: int, hi: int) -> tuple[int, int]:
    """Rows to load to render rows [lo, hi) (with exact mixing: plus their partners' windows)."""
    return make_renderer(spec, 0, manifest).rows_to_load(lo, hi)


def render_rows(renderer: PlainRenderer, view: int, rows: LoadedRows, a: int,
                z: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """uint8 views (z-a, C, H, W), params records and uint32 pixel digests of rows [a, z) for view ``view``;
    ``rows`` holds every row ``renderer.rows_to_load(a, z)`` asks for."""
    rendered = [renderer.render(view, rows, row) for row in range(a, z)]
    return (torch.stack([r.pixels for r in rendered]), np.stack([r.params for r in rendered]),
            np.asarray([r.digest for r in rendered], dtype=np.uint32))


class UnitStream(IterableDataset):
    """Yields one rendered batch at a time: for each chunk group, for each fixed batch of rows, for each view.
    A worker reads a chunk's rows in one pass, decodes each image once and renders all of its pending views."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, seed: int, chunk_rows: int, batch_size: int,
                 groups: list[tuple[int, list[int]]]):
        self.manifest, self.spec, self.seed = manifest, spec, seed
        self.chunk_rows, self.batch_size, self.groups = chunk_rows, batch_size, groups

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n = self.manifest.num_samples
        renderer = make_renderer(self.spec, self.seed, self.manifest)
        for i, (chunk, views) in enumerate(self.groups):
            if i % workers != worker:
                continue
            lo, hi = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, n)
            first, last = renderer.rows_to_load(lo, hi)
            samples = read_rows(self.manifest, first, last)
            bounds = batch_bounds(lo, hi, self.batch_size)
            for b, (a, z) in enumerate(bounds):
                need_lo, need_hi = renderer.rows_to_load(a, z)
                rows = LoadedRows(samples[need_lo - first:need_hi - first], keep_images=True)   # decode once
                keys = [raw.key for raw in samples[a - first:z - first]]
                for view in views:
                    tensors, records, digests = render_rows(renderer, view, rows, a, z)
                    yield {"view": view, "chunk": chunk, "batch": b, "nbatches": len(bounds), "images": tensors,
                           "params": torch.from_numpy(records), "digests": torch.from_numpy(digests.view(np.int32)),
                           "keys": keys}


class EvalStream(IterableDataset):
    """Evaluation views (whole image resized) of a manifest with labels, in fixed batches."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, batch_size: int, chunk_rows: int):
        self.manifest, self.spec, self.batch_size, self.chunk_rows = manifest, spec, batch_size, chunk_rows

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n = self.manifest.num_samples
        for i, lo in enumerate(range(0, n, self.chunk_rows)):
            if i % workers != worker:
                continue
            samples = read_rows(self.manifest, lo, min(lo + self.chunk_rows, n))
            for a in range(0, len(samples), self.batch_size):
                raws = samples[a:a + self.batch_size]
                yield {"images": torch.stack([render_eval(self.spec, r) for r in raws]),
                       "labels": torch.tensor([r.label for r in raws], dtype=torch.int64),
                       "keys": [r.key for r in raws]}


def make_loader(dataset: IterableDataset, workers: int, device: torch.device) -> DataLoader:
    kwargs = {"prefetch_factor": 4, "worker_init_fn": seed_worker} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda", **kwargs)


def measure_accuracy(runner: TeacherRunner, test: Manifest, spec: ViewSpec, batch_size: int, workers: int,
                     progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy of every teacher on the eval views of ``test``; raises naming teacher and key on NaN."""
    device = runner.device
    correct = {t.name: torch.zeros((), dtype=torch.int64, device=device) for t in runner.teachers}
    finite = {t.name: [] for t in runner.teachers}
    keys: list[str] = []
    stream = EvalStream(test, spec, batch_size, max(batch_size, default_chunk_rows(test)))
    with torch.inference_mode():
        for item in _progress(make_loader(stream, workers, device), progress, "teacher accuracy", None):
            views = item["images"].to(device, non_blocking=True)
            labels = item["labels"].to(device, non_blocking=True)
            keys.extend(item["keys"])
            for teacher in runner.teachers:
                logits = runner.logits(teacher, views)
                finite[teacher.name].append(torch.isfinite(logits).all(dim=1))
                correct[teacher.name] += (logits.argmax(dim=1) == labels).sum()
    out = {}
    for teacher in runner.teachers:
        ok = torch.cat(finite[teacher.name]).cpu().numpy() if finite[teacher.name] else np.ones(0, bool)
        if not ok.all():
            key = keys[int(np.argmin(ok))]
            raise BuildError(f"teacher {teacher.name} produced non-finite logits (NaN/Inf) on test sample {key!r} "
                             f"of {test.path} ({int((~ok).sum())} of {len(ok)} test samples)")
        out[teacher.name] = int(correct[teacher.name].item()) / max(1, test.num_samples)
    return out


def _progress(iterable, enabled: bool, desc: str, total, unit: str = "batch"):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)


def check_shards_readable(manifest: Manifest, verify: bool) -> None:
    """Every listed shard exists and has its recorded size (and, with ``verify``, its recorded sha256) — before
    any work is written."""
    try:
        check_shards(manifest, sha256=verify)
    except ManifestError as exc:
        raise BuildError(str(exc)) from None


def data_channels(manifest: Manifest) -> int:
    """The manifest's channel count (1: L, 3: RGB): every image is decoded to it."""
    try:
        return manifest.require_channels()
    except ManifestError as exc:
        raise BuildError(str(exc)) from None


def check_teacher_channels(loaded, manifest: Manifest) -> None:
    """Every teacher takes the images' channel count (refused before any work)."""
    channels = data_channels(manifest)
    for t in loaded:
        if t.in_chans is not None and t.in_chans != channels:
            raise BuildError(f"teacher {t.name} ({t.checkpoint}) takes {t.in_chans}-channel input but the images "
                             f"of {manifest.path} have {channels} channel(s)")


def open_test_set(test_data: str, manifest: Manifest) -> Manifest:
    """``--test-data``: a manifest with the classes and channels of ``--data`` (checked before any work)."""
    try:
        test = Manifest.load(test_data)
    except ManifestError as exc:
        raise BuildError(f"--test-data: {exc}") from None
    if test.num_classes != manifest.num_classes:
        raise BuildError(f"--test-data {test_data} has {test.num_classes} classes, --data has {manifest.num_classes}")
    if data_channels(test) != data_channels(manifest):
        raise BuildError(f"--test-data {test_data} has {test.channels}-channel images, --data "
                         f"{data_channels(manifest)}")
    return test


def record_accuracy(records, accuracy: dict[str, float], test: Manifest) -> None:
    """Each teacher record's test accuracy and the test set it was measured on (a resume reuses it only there)."""
    for r in records:
        r.test_accuracy = accuracy[r.name]
        r.extra["test_fingerprint"] = test.fingerprint
        r.extra["test_samples"] = test.num_samples
