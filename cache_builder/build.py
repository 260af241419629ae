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

import collections
import concurrent.futures
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared import provenance
from shared.augment import ViewSpec
from shared.cache_schema import (CACHE_FORMAT, STATUS_BUILDING, STATUS_COMPLETE, STATUS_CREATING, CacheAttrs,
                                 LogitCache, RESERVED_NAMES, TeacherRecord, TopK, create_arrays,
                                 normalize_url, open_root, read_attrs)
from shared.errors import CitUserError
from shared.io import is_local, local_path
from shared.manifest import Manifest, ManifestError, check_shards
from shared.reader import RawSample, distributed_context, pieces_for_rows, read_piece, seed_worker
from shared.shards import ShardError
from shared.store_lock import StoreLock
from shared.targets import encode_logits
from shared.views import VIEW_CODE, LoadedRows, PlainRenderer, make_renderer, render_eval

log = logging.getLogger(__name__)

MAX_DEFAULT_CHUNK_ROWS = 4096


class BuildError(CitUserError):
    """Bad input for a cache build (or a teacher misbehaving); the message names the culprit."""


# ---------------------------------------------------------------------------------------------------------------
# Teachers

@dataclass
class Teacher:
    name: str
    checkpoint: str
    model: torch.nn.Module
    record: TeacherRecord
    in_chans: int | None


def _meta(meta, *names, default=None):
    for name in names:
        if isinstance(meta, dict) and name in meta:
            return meta[name]
        if not isinstance(meta, dict) and hasattr(meta, name):
            return getattr(meta, name)
    return default


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def parse_teacher_args(items) -> list[tuple[str, str]]:
    """``["conv=ckpt.pt", ...]`` or a dict -> [(name, path)], names checked (valid group names, unique)."""
    pairs = list(items.items()) if isinstance(items, dict) else []
    if not isinstance(items, dict):
        for item in items:
            if isinstance(item, (tuple, list)):
                pairs.append((str(item[0]), str(item[1])))
                continue
            if "=" not in item:
                raise BuildError(f"--teacher {item!r} must look like NAME=CHECKPOINT")
            name, path = item.split("=", 1)
            pairs.append((name.strip(), path.strip()))
    if not pairs:
        raise BuildError("at least one --teacher NAME=CHECKPOINT is needed")
    seen = set()
    for name, _ in pairs:
        if not _NAME.match(name) or name in RESERVED_NAMES:
            raise BuildError(f"teacher name {name!r} is not allowed: use letters, digits, '_' and '-', and not "
                             f"{' or '.join(RESERVED_NAMES)}")
        if name in seen:
            raise BuildError(f"teacher name {name!r} is given twice")
        seen.add(name)
    return pairs


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


def load_teachers(pairs: list[tuple[str, str]], num_classes: int, device: torch.device,
                  view_size: int | None = None) -> list[Teacher]:
    """``view_size``: the side of the views; a teacher built for another input size gets them resized."""
    from shared.checkpoint import load_checkpoint
    teachers = []
    for name, path in pairs:
        try:
            model, meta = load_checkpoint(path, expect_classes=num_classes)
        except FileNotFoundError:
            raise BuildError(f"teacher {name}: checkpoint {path} does not exist") from None
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise BuildError(f"teacher {name}: cannot use checkpoint {path}: {exc}") from None
        classes = int(_meta(meta, "num_classes"))
        if classes != num_classes:   # load_checkpoint checks too; never trust a single guard
            raise BuildError(f"teacher {name} ({path}) predicts {classes} classes but the data has {num_classes}")
        mean, std = _meta(meta, "mean", "input_mean"), _meta(meta, "std", "input_std")
        if mean is None or std is None:
            raise BuildError(f"teacher {name}: checkpoint {path} does not record its input normalisation")
        kind = str(_meta(meta, "kind", default="other") or "other")
        record = TeacherRecord(name=name, kind=kind, arch=str(_meta(meta, "arch", default="?")),
                               checkpoint_sha256=str(_meta(meta, "sha256", "checkpoint_sha256", default="")),
                               num_classes=classes, mean=[float(x) for x in mean], std=[float(x) for x in std],
                               extra={"checkpoint": os.path.abspath(local_path(path)) if is_local(path) else str(path)})
        record.input_size, record.interpolation = meta.resize_for(view_size)
        acc = _meta(meta, "test_accuracy", "accuracy")
        if acc is not None:
            record.extra["checkpoint_test_accuracy"] = float(acc)
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        in_chans = _meta(meta, "in_chans")
        teachers.append(Teacher(name, str(path), model, record, int(in_chans) if in_chans is not None else None))
    return teachers


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise BuildError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise BuildError("bf16 autocast is only used on CUDA; use --precision fp32 (or auto) on CPU")
    return precision


class TeacherRunner:
    """Runs every teacher on a uint8 batch on the device; returns device tensors, never syncs with the host."""

    def __init__(self, teachers: list[Teacher], device: torch.device, precision: str, topk: int,
                 temperatures: tuple[float, ...] = (1.0,)):
        self.teachers, self.device, self.precision, self.topk = teachers, device, precision, topk
        self.temperatures = tuple(temperatures)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False      # same algorithm for the same shapes: reproducible bits
            torch.backends.cudnn.deterministic = True

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def normalise(self, teacher: Teacher, views: torch.Tensor) -> torch.Tensor:
        """The teacher's own input size (resized on the device, when it differs) and normalisation."""
        from shared.models.normalize import teacher_input   # here: importing timm slows every `cit` command
        record = teacher.record
        return teacher_input(views, record.mean, record.std, record.input_size, record.interpolation)

    def logits(self, teacher: Teacher, views: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on the device -> float32 logits (B, classes)."""
        with self._autocast():
            out = teacher.model(self.normalise(teacher, views))
        if isinstance(out, dict):       # models with several heads: the class head
            out = out["cls"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def packed_topk(self, views: torch.Tensor) -> torch.Tensor:
        """float32 (B, T, 2K+S+1): per teacher [top-k log-probs, their indices, tail log-mass at each cached τ,
        a finiteness flag of the full logits]: all from the full fp32 logits on the device (``shared.targets``)."""
        parts = []
        for teacher in self.teachers:
            logits = self.logits(teacher, views)
            logp, indices, tail = encode_logits(logits, self.topk, self.temperatures)
            finite = torch.isfinite(logits).all(dim=1, keepdim=True).float()
            parts.append(torch.cat([logp, indices.float(), tail, finite], dim=1))
        return torch.stack(parts, dim=1)


def unpack_topk(packed: np.ndarray, teacher_index: int, topk: int, num_classes: int) -> tuple[TopK, np.ndarray]:
    """The stored record of one teacher and the per-row finiteness of its logits."""
    block = packed[:, teacher_index]
    logp, tail = block[:, :topk], block[:, 2 * topk:-1]
    ok = (block[:, -1] == 1) & np.isfinite(logp).all(axis=1) & ~np.isnan(tail).any(axis=1)
    return TopK.from_float(logp, block[:, topk:2 * topk], tail, num_classes), ok


def check_finite(out: tuple[TopK, np.ndarray], teacher: str, keys: list[str], where: str) -> None:
    bad = ~out[1]
    if bad.any():
        first = int(np.argmax(bad))
        raise BuildError(f"teacher {teacher} produced non-finite logits (NaN/Inf) on sample {keys[first]!r} "
                         f"({where}; {int(bad.sum())} of {len(keys)} samples in that batch); nothing was stored "
                         "for it")


# ---------------------------------------------------------------------------------------------------------------
# Data: units of work rendered in DataLoader workers

def default_cpu_threads(workers: int) -> int:
    """A new CPU cache's intra-op threads: the cores the render workers leave to the teachers (chosen by
    measurement on 2 cores: 1 thread + 1 worker reached 0.98x the teachers' in-memory inference, 2 threads + 1 worker
    0.84x — the teachers' second thread and the worker fought for one core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - workers))


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


# ---------------------------------------------------------------------------------------------------------------
# Teacher accuracy (eval views of the test set)

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


# ---------------------------------------------------------------------------------------------------------------
# The output location

def inspect_out(url: str, storage_options: dict | None) -> tuple[str, CacheAttrs | None]:
    """("absent" | "empty" | "cache" | "old format" | "foreign", attrs): what ``url`` holds now."""
    url = normalize_url(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        return "absent", None
    if fs.isfile(path):
        return "foreign", None
    if not fs.ls(path, detail=False):
        return "empty", None
    try:
        root = open_root(url, "r", storage_options)
    except Exception:  # noqa: BLE001 — any failure to read it as a cit cache means "something else is there"
        return "foreign", None
    data = dict(root.attrs)
    if "dataset_fingerprint" in data and data.get("format") != CACHE_FORMAT:
        return "old format", None        # a cit cache of another format: replaced only with --force
    try:
        return "cache", read_attrs(root, url)
    except Exception:  # noqa: BLE001
        return "foreign", None


def check_out_reachable(url: str, storage_options: dict | None) -> None:
    """An object-store ``--out``: its bucket exists and these credentials can list it — before anything is written
    (writing is then proven by the store's lock, the first object the build puts)."""
    if is_local(url):
        return
    fs, path = fsspec.core.url_to_fs(normalize_url(url), **(storage_options or {}))
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"s3", "s3a", "gs", "gcs", "az", "abfs", "adl"}:    # no buckets (memory://, ...)
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)     # not fs.exists: it answers False for an endpoint that cannot be reached
    except PermissionError as exc:
        raise BuildError(f"--out {url}: access to bucket {bucket!r} denied ({exc}); check the credentials "
                         "(AWS_* variables or --storage-option key=... secret=...)") from None
    except FileNotFoundError:
        raise BuildError(f"--out {url}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                         "create it or fix --out / --storage-option endpoint_url=...")


def remove_store(url: str, storage_options: dict | None) -> None:
    url = normalize_url(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(path):
        fs.rm(path, recursive=True)


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


# ---------------------------------------------------------------------------------------------------------------
# Build

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


class StoreSession:
    """One change of a store by every rank: the process group, the store's lease (rank 0 takes it) and the
    caller's thread count (a build pins its own), all given back on exit, whatever happened."""

    def __init__(self):
        self.comm = _Dist()
        self.lock: StoreLock | None = None
        self._caller_threads = torch.get_num_threads()

    def __enter__(self) -> "StoreSession":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
        torch.set_num_threads(self._caller_threads)
        self.comm.close()


class _Dist:
    """Collectives over a gloo group (works for CPU tensors whatever backend the caller initialised)."""

    def __init__(self):
        self.rank, self.world = distributed_context()
        self.owned = False
        self.group = None
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self.owned = True
            elif dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


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
    runner = TeacherRunner(loaded, dev, precision, topk, temperatures)
    intended = CacheAttrs(dataset_fingerprint=manifest.fingerprint, num_samples=manifest.num_samples,
                          num_classes=manifest.num_classes, views=views, first_view=b.first_view, topk=topk,
                          seed=seed,
                          augment=spec.to_dict(), chunk_rows=chunk_rows, teachers=[t.record for t in loaded],
                          status=STATUS_CREATING,
                          build={"batch_size": batch_size, "precision": precision, "device": dev.type,
                                 "cpu_threads": threads if dev.type == "cpu" else None},
                          temperatures=list(temperatures),
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
        mine = pending[comm.rank * len(pending) // comm.world:(comm.rank + 1) * len(pending) // comm.world]
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


def group_units(units: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """[(chunk, view)] in chunk order -> [(chunk, [views])]: a worker reads a chunk's rows once for all its views."""
    groups: list[tuple[int, list[int]]] = []
    for c, v in units:
        if groups and groups[-1][0] == c:
            groups[-1][1].append(v)
        else:
            groups.append((c, [v]))
    return groups


@dataclass
class BuildPlan:
    """What a build does at ``--out``: ``create`` | ``resume`` | ``replace`` | ``refuse`` (``reason`` says why and what
    to run instead; growing a complete cache is ``cit cache extend`` / ``add-teacher``)."""
    action: str
    reason: str = ""


def plan_build(state: str, existing: CacheAttrs | None, intended: CacheAttrs, force: bool, out: str) -> BuildPlan:
    """Pure: the action from what ``out`` holds (``inspect_out``) and the cache intended."""
    if state == "foreign":
        return BuildPlan("refuse", f"--out {out} already holds something that is not a cit cache; refusing to touch "
                                   "it (choose another location or delete it yourself)")
    if state == "old format":
        return BuildPlan("replace") if force else BuildPlan(
            "refuse", f"--out {out} holds a cit cache of an older format (this cit writes format {CACHE_FORMAT}); "
                      "pass --force to rebuild it there, or choose another --out")
    if state in ("absent", "empty"):
        return BuildPlan("create")
    if force:
        return BuildPlan("replace")
    if existing.growth:
        return BuildPlan("refuse", f"--out {out} is being changed by `cit cache {existing.growth.get('op')}` "
                                   "(interrupted or running); rerun that command to finish it, or pass --force to "
                                   "rebuild the cache")
    diff = existing.identity_diff(intended)
    if not diff:
        return BuildPlan("resume")
    grow = _growth_hint(existing, intended, out)
    return BuildPlan("refuse", f"--out {out} already holds a different cache ({'; '.join(diff[:4])}); "
                               + (grow or "pass --force to replace it, or choose another --out"))


def _growth_hint(existing: CacheAttrs, intended: CacheAttrs, out: str) -> str:
    """When the intended cache only adds views or teachers to a complete one: the command that grows it."""
    if existing.status != STATUS_COMPLETE:
        return ""
    a, b = existing.identity(), intended.identity()
    others = [k for k in a if k not in ("views", "teachers") and a[k] != b.get(k)]
    if others:
        return ""
    if a["teachers"] == b["teachers"] and b["views"] > a["views"]:
        return (f"to add views without recomputing the others: `cit cache extend {out} --views {b['views']} --data "
                "MANIFEST` (or --force to rebuild it)")
    if a["views"] == b["views"] and b["teachers"][:len(a["teachers"])] == a["teachers"]:
        new = [t.name for t in intended.teachers[len(existing.teachers):]]
        return (f"to add teachers without recomputing the others: `cit cache add-teacher {out} "
                f"{' '.join(n + '=CHECKPOINT' for n in new)} --data MANIFEST` (or --force to rebuild it)")
    return ""


def _prepare(settings: BuildSettings, manifest, loaded, runner, intended: CacheAttrs) -> CacheAttrs:
    """All refusals happen here, before anything is written; returns the attrs of the (created or resumed) cache."""
    s = settings
    spec, seed, out, test_data, min_teacher_acc, force = s.spec, s.seed, s.out, s.test_data, s.min_teacher_acc, s.force
    verify, storage_options, batch_size, workers, progress = (s.verify_shards, s.storage_options, s.batch_size,
                                                              s.workers, s.progress)
    check_shards_readable(manifest, verify)
    channels = data_channels(manifest)
    for t in loaded:
        if t.in_chans is not None and t.in_chans != channels:
            raise BuildError(f"teacher {t.name} ({t.checkpoint}) takes {t.in_chans}-channel input but the images "
                             f"of {manifest.path} have {channels} channel(s)")
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
        try:
            test = Manifest.load(test_data)
        except ManifestError as exc:
            raise BuildError(f"--test-data: {exc}") from None
        if test.num_classes != manifest.num_classes:
            raise BuildError(f"--test-data {test_data} has {test.num_classes} classes, --data has "
                             f"{manifest.num_classes}")
        if data_channels(test) != channels:
            raise BuildError(f"--test-data {test_data} has {test.channels}-channel images, --data {channels}")
        test_fp = test.fingerprint
        stored = {t.name: t for t in existing.teachers} if resume else {}
        reuse = all(stored.get(r.name) is not None and stored[r.name].test_accuracy is not None
                    and stored[r.name].extra.get("test_fingerprint") == test_fp for r in records)
        if reuse:
            acc = {r.name: stored[r.name].test_accuracy for r in records}
        else:
            check_shards_readable(test, verify)
            acc = measure_accuracy(runner, test, spec, batch_size, workers, progress)
        for r in records:
            r.test_accuracy = acc[r.name]
            r.extra["test_fingerprint"] = test_fp
            r.extra["test_samples"] = test.num_samples
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
    attrs = replace(intended, teachers=records, status=STATUS_CREATING)
    root = open_root(out, "a" if resume else "w", storage_options)
    root.attrs.put(attrs.to_json_dict())           # creating: identity known, arrays not yet
    create_arrays(root, attrs, num_params)
    attrs.status = STATUS_BUILDING
    root.attrs.put(attrs.to_json_dict())
    return attrs


def _remove_partial_writes(url: str) -> None:
    """A killed local build can leave Zarr's temporary ``*.partial`` files (its writes are write + rename); they are
    never read, but do not let them pile up on disk."""
    url = normalize_url(url)
    if "://" in url:
        return
    for folder, _, files in os.walk(url):
        for name in files:
            if name.endswith(".partial"):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


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


@dataclass
class _Unit:
    view: int
    chunk: int
    nbatches: int
    parts: dict = field(default_factory=dict)   # batch -> (packed host tensor, event, params, keys)


def _write(sink, unit: _Unit, names: list[str], topk: int, num_classes: int) -> None:
    """Assemble a finished unit and hand it to ``sink(view, chunk, params, outputs, digests)`` (a store write)."""
    packed, params, digests, keys = [], [], [], []
    for b in range(unit.nbatches):
        host, event, p, d, k = unit.parts[b]
        if event is not None:
            event.synchronize()
        packed.append(host.numpy())
        params.append(p.numpy())
        digests.append(d.numpy().view(np.uint32))
        keys.extend(k)
    packed = np.concatenate(packed)
    outputs = {}
    for i, name in enumerate(names):
        out = unpack_topk(packed, i, topk, num_classes)
        check_finite(out, name, keys, f"view {unit.view}, chunk {unit.chunk}")
        outputs[name] = out[0]
    sink(unit.view, unit.chunk, np.concatenate(params), outputs, np.concatenate(digests))


def write_whole_unit(cache: LogitCache):
    """The sink of a build: every array of the unit, then its ``done`` element."""
    return lambda view, chunk, params, outputs, digests: cache.write_unit(view, chunk, params, outputs,
                                                                         digests=digests)


def _run_units(sink, runner: TeacherRunner, manifest: Manifest, spec: ViewSpec, seed: int,
               attrs: CacheAttrs, groups, batch_size: int, workers: int, progress: bool) -> tuple[int, int]:
    """Run the teachers over the units of ``groups`` ([(chunk, [views])]) and give each finished unit to ``sink``."""
    if not groups:
        return 0, 0
    device = runner.device
    names = [t.name for t in runner.teachers]
    total = sum((min((c + 1) * attrs.chunk_rows, attrs.num_samples) - c * attrs.chunk_rows) * len(vs)
                for c, vs in groups)
    stream = UnitStream(manifest, spec, seed, attrs.chunk_rows, batch_size, groups)
    loader = make_loader(stream, min(workers, len(groups)), device)
    units: dict[tuple[int, int], _Unit] = {}
    futures: collections.deque = collections.deque()
    built_units = built_views = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="cache build", unit="view", unit_scale=True, dynamic_ncols=True,
                   file=sys.stderr, smoothing=0.05)
    cuda = device.type == "cuda"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as writer:
        try:
            with torch.inference_mode():
                for item in loader:
                    views = item["images"].to(device, non_blocking=True)
                    packed = runner.packed_topk(views)
                    event = None
                    if cuda:
                        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                        host.copy_(packed, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                    else:
                        host = packed
                    key = (item["view"], item["chunk"])
                    unit = units.setdefault(key, _Unit(item["view"], item["chunk"], item["nbatches"]))
                    unit.parts[item["batch"]] = (host, event, item["params"], item["digests"], item["keys"])
                    rows = len(item["keys"])
                    built_views += rows
                    if bar is not None:
                        bar.update(rows)
                    if len(unit.parts) == unit.nbatches:
                        del units[key]
                        futures.append(writer.submit(_write, sink, unit, names, attrs.topk, attrs.num_classes))
                        built_units += 1
                    while futures and (futures[0].done() or len(futures) > 8):
                        futures.popleft().result()      # re-raises a writer error (NaN, storage) here
            while futures:
                futures.popleft().result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
    return built_units, built_views
