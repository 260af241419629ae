"""The logit cache's Zarr v3 layout — the one place it is written down.  Both stages and ``cit cache`` use it.

    <root>/                       group; attributes = CacheAttrs (format, fingerprint, spec, seed, E, K, teachers,
                                  status)
    <root>/params                 float32 (E, N, P)   view params records (shared.augment.ViewParams)
    <root>/done                   uint8   (E, n_chunks), one element per Zarr chunk: the completion map
    <root>/<teacher>/values       float16 (E, N, K)   top-k logits, sorted descending
    <root>/<teacher>/indices      uint8 / int16 / int32 (E, N, K)  their class ids (narrowest that holds C-1)
    <root>/<teacher>/lse          float32 (E, N)      log-sum-exp of the full logits

All data arrays are chunked ``(1, chunk_rows, ...)``: a work unit is (view, row chunk), and a writer owns every
chunk of its unit in every array, so no two processes ever write the same chunk (partial-chunk writes from
several processes lose rows).  The unit's ``done`` element is written last; a cache is ``complete`` only when
every element of ``done`` is 1.  Readers fetch row *blocks* (one Zarr call per array per block), never rows.

Readable with plain ``zarr``:  ``g = zarr.open_group(url, mode="r"); g["t1/values"][v, rows]``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

CACHE_FORMAT = 1
STATUS_BUILDING, STATUS_COMPLETE = "building", "complete"


class CacheError(ValueError):
    """The cache is missing, incomplete, or does not match what the caller expects; the message says what."""


@dataclass
class TeacherRecord:
    name: str                      # the name chosen at build time (group name in the store)
    kind: str                      # conv | inv | other
    arch: str
    checkpoint_sha256: str
    num_classes: int
    mean: list[float]
    std: list[float]
    test_accuracy: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CacheAttrs:
    dataset_fingerprint: str
    num_samples: int
    num_classes: int
    views: int
    topk: int
    seed: int
    augment: dict                  # shared.augment.ViewSpec.to_dict()
    chunk_rows: int
    teachers: list[TeacherRecord]
    status: str = STATUS_BUILDING
    format: int = CACHE_FORMAT
    created_by: str = "cit"

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def chunk_rows_range(self, chunk: int) -> tuple[int, int]:
        lo = chunk * self.chunk_rows
        return lo, min(lo + self.chunk_rows, self.num_samples)

    def teacher(self, name: str) -> TeacherRecord:
        for record in self.teachers:
            if record.name == name:
                return record
        raise CacheError(f"teacher {name!r} is not in this cache; it has {[t.name for t in self.teachers]}")

    def identity(self) -> dict:
        """What must agree for two builds to be the same cache (status excluded)."""
        data = asdict(self)
        data.pop("status")
        return data

    def to_json_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json_dict(cls, data: dict) -> "CacheAttrs":
        data = dict(data)
        data["teachers"] = [TeacherRecord(**t) for t in data["teachers"]]
        return cls(**data)


def index_dtype(num_classes: int) -> np.dtype:
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 32768:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _compressors(dtype: np.dtype):
    return [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle if dtype.itemsize > 1
                       else BloscShuffle.noshuffle, typesize=dtype.itemsize)]


def open_root(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    kwargs = {"storage_options": storage_options} if storage_options and "://" in url else {}
    return zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)


def create_arrays(root: zarr.Group, attrs: CacheAttrs, num_params: int) -> None:
    """Create every array of the layout (empty); attributes are written by the caller."""
    e, n, k, r = attrs.views, attrs.num_samples, attrs.topk, attrs.chunk_rows

    def make(path, shape, chunks, dtype, fill):
        dtype = np.dtype(dtype)
        root.create_array(path, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                          compressors=_compressors(dtype), overwrite=True)

    make("params", (e, n, num_params), (1, r, num_params), np.float32, np.nan)
    make("done", (e, attrs.num_chunks), (1, 1), np.uint8, 0)
    for teacher in attrs.teachers:
        make(f"{teacher.name}/values", (e, n, k), (1, r, k), np.float16, np.nan)
        make(f"{teacher.name}/indices", (e, n, k), (1, r, k), index_dtype(attrs.num_classes), 0)
        make(f"{teacher.name}/lse", (e, n), (1, r), np.float32, np.nan)


@dataclass
class TopK:
    """Cached teacher output for a block of rows of one view."""
    values: np.ndarray    # float16 (B, K), descending
    indices: np.ndarray   # int (B, K)
    lse: np.ndarray       # float32 (B,)


class LogitCache:
    """Read (and, for the builder, write) access to a cache through the layout above."""

    def __init__(self, root: zarr.Group, attrs: CacheAttrs):
        self.root, self.attrs = root, attrs

    @classmethod
    def open(cls, url: str, mode: str = "r", allow_incomplete: bool = False,
             storage_options: dict | None = None) -> "LogitCache":
        try:
            root = open_root(url, mode, storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
            raise CacheError(f"no cit cache at {url}: {exc}") from None
        data = dict(root.attrs)
        if "dataset_fingerprint" not in data:
            raise CacheError(f"{url} is a Zarr group but not a cit cache (no cit attributes)")
        if data.get("format") != CACHE_FORMAT:
            raise CacheError(f"cache {url} has format {data.get('format')}, this cit reads format {CACHE_FORMAT}")
        attrs = CacheAttrs.from_json_dict(data)
        if attrs.status != STATUS_COMPLETE and not allow_incomplete:
            done = int(np.asarray(root["done"][:]).sum())
            raise CacheError(f"cache {url} is incomplete ({done} of {attrs.views * attrs.num_chunks} chunks "
                             "written); finish it by rerunning `cit cache build` with the same options, "
                             "or pass allow_incomplete")
        return cls(root, attrs)

    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.attrs.teachers]

    def read_topk(self, teacher: str, view: int, lo: int, hi: int) -> TopK:
        self.attrs.teacher(teacher)
        group = self.root[teacher]
        return TopK(np.asarray(group["values"][view, lo:hi]), np.asarray(group["indices"][view, lo:hi]),
                    np.asarray(group["lse"][view, lo:hi]))

    def read_params(self, view: int, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.root["params"][view, lo:hi])

    def done_map(self) -> np.ndarray:
        return np.asarray(self.root["done"][:])

    def write_unit(self, view: int, chunk: int, params: np.ndarray, outputs: dict[str, TopK]) -> None:
        """Write one whole (view, chunk) unit in every array, then mark it done (last, so a kill leaves it undone)."""
        lo, hi = self.attrs.chunk_rows_range(chunk)
        self.root["params"][view, lo:hi] = params
        for name, out in outputs.items():
            group = self.root[name]
            group["values"][view, lo:hi] = out.values
            group["indices"][view, lo:hi] = out.indices
            group["lse"][view, lo:hi] = out.lse
        self.root["done"][view, chunk] = 1
