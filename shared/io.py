"""Small I/O helpers shared by both stages: atomic writes on local paths and fsspec URLs."""
from __future__ import annotations

import os
import tempfile

import fsspec


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old file or the whole new one, never a prefix."""
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; shared storage needs the usual mode
            os.replace(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.filename is None:   # a full disk: say which file did not fit
                raise OSError(exc.errno, exc.strerror, path) from exc
            raise
    else:  # object stores: a single PUT is atomic
        with fsspec.open(url, "wb") as f:
            f.write(data)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode())
