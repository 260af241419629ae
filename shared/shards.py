"""WebDataset tar shards: deterministic writing and streaming reading.

A sample is a dict ``{"__key__": str, "<ext>": bytes, ...}``; tar members ``<key>.<ext>`` with the same key are
consecutive.  We write the tar ourselves (fixed mtime/uid/mode) so the same samples always give the same shard
bytes, hence a stable dataset fingerprint.  Keys must not contain dots: webdataset splits ``__key__`` at the first
dot, so ``a.b.png`` would silently become key ``a`` with field ``b.png``.
"""
from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from shared.errors import CitUserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class ShardError(CitUserError):
    """A shard or a sample in it is malformed; the message names the shard and key."""


def check_key(key: str, where: str = "") -> None:
    if not key or "." in key or "/" in key:
        raise ShardError(f"invalid sample key {key!r}{' in ' + where if where else ''}: "
                         "keys must be non-empty and contain no '.' or '/' (webdataset cuts keys at the first dot)")


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW or HxWxC -> PNG bytes (deterministic: fixed compression level, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_image(data: bytes, shard: str = "?", key: str = "?") -> Image.Image:
    """Decode image bytes fully (so truncated files fail here, naming shard and key)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ShardError(f"cannot decode image of key {key!r} in shard {shard}: {exc}") from exc
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image


def image_field(sample: dict) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise ShardError(f"sample {sample.get('__key__')!r} has no image field (one of {IMAGE_EXTS}); "
                     f"fields: {sorted(k for k in sample if not k.startswith('__'))}")


@dataclass
class WrittenShard:
    path: str
    samples: int


class ShardWriter:
    """Writes samples into numbered shards ``<pattern % index>`` of at most ``max_count`` samples each."""

    def __init__(self, pattern: str, max_count: int):
        if max_count <= 0:
            raise ValueError(f"shard size must be positive, got {max_count}")
        self.pattern, self.max_count = pattern, max_count
        self.written: list[WrittenShard] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0

    def _open_next(self) -> None:
        self.close_current()
        path = self.pattern % len(self.written)
        self._file = fsspec.open(path, "wb").open()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.written.append(WrittenShard(path, 0))

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        check_key(key)
        if self._tar is None or self.written[-1].samples >= self.max_count:
            self._open_next()
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uname = info.gname = "cit"
            self._tar.addfile(info, io.BytesIO(data))
        self.written[-1].samples += 1

    def close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close_current()


def iter_shard(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Stream samples of one tar shard in file order, grouping members by key (the part before the first dot)."""
    current: dict | None = None
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        raise ShardError(f"tar member {member.name!r} in shard {url} has no field extension")
                    key, ext = name.split(".", 1)
                    data = tar.extractfile(member).read()
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    if ext in current:
                        raise ShardError(f"duplicate field {ext!r} for key {key!r} in shard {url} "
                                         "(keys must be unique and must not contain dots)")
                    current[ext] = data
    except (tarfile.TarError, EOFError) as exc:
        raise ShardError(f"unreadable shard {url}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ShardError(f"shard not found: {url}") from exc
    if current is not None:
        yield current


def read_label(sample: dict, shard: str) -> int:
    try:
        return int(sample["cls"].decode().strip())
    except KeyError:
        raise ShardError(f"sample {sample['__key__']!r} in shard {shard} has no 'cls' field") from None
    except ValueError:
        raise ShardError(f"sample {sample['__key__']!r} in shard {shard} has a non-integer 'cls' "
                         f"{sample['cls'][:20]!r}") from None
