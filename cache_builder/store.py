"""The output store: what ``--out`` holds, whether it can be reached, its removal, the partial writes a killed
build leaves, and the session (process group, lease, threads) of one change of it by every rank."""
from __future__ import annotations

import os

import fsspec
import torch
import torch.distributed as dist

from cache_builder.errors import BuildError
from shared.cache_schema import CACHE_FORMAT, CacheAttrs, normalize_url, open_root, read_attrs
from shared.io import is_local
from shared.reader import distributed_context
from shared.store_lock import StoreLock


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
