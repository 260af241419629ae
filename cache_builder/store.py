"""The output store: what ``--out`` holds, whether it can be reached, its removal and the partial writes a killed
build leaves (no torch: ``cit cache merge`` / ``export`` use it; the session of a change by every rank is
``cache_builder.session``)."""
from __future__ import annotations

import os

import fsspec

from cache_builder.errors import BuildError
from shared.cache_schema import CACHE_FORMAT, CacheAttrs, normalize_url, open_root, read_attrs
from shared.io import is_local


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
