"""Small I/O helpers shared by both stages: atomic writes on local paths and fsspec URLs."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import fsspec


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_local(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (``.tmp-<name>…``), fsync'ed, then renamed over ``path``:
    readers see the old file or the whole new one, never a prefix.  A full disk names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; shared storage needs the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:   # a full disk: say which file did not fit
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old file or the whole new one, never a prefix."""
    if is_local(url):
        atomic_write_local(local_path(url), lambda tmp: _write_bytes(tmp, data))
    else:  # object stores: a single PUT is atomic
        with fsspec.open(url, "wb") as f:
            f.write(data)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode())
