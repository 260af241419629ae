"""WebDataset tar shards: deterministic writing, streaming reading, and the one image decode both stages use.

A sample is a dict ``{"__key__": str, "<ext>": bytes, ...}``, grouped exactly as webdataset groups tar members
(``webdataset.tariterators.base_plus_ext`` and ``group_by_keys``): the key is the member name up to the first dot
of its *basename*, directory prefixes included (``train/x.jpg`` and ``val/x.jpg`` are the keys ``train/x`` and
``val/x``); the extension after that dot is lower-cased (``x.JPG`` -> field ``jpg``); names without a dot and
``__meta__`` names are skipped.  A key's members must be adjacent.  Known fields: ``jpg jpeg png webp`` (image),
``cls`` (class id), ``json`` / ``txt`` (carried along, unused).  Shard URLs are opened as webdataset opens them
(``webdataset.gopen``: paths, ``file://``, ``pipe:CMD``, ``http(s)://`` via curl, ...), and any other fsspec URL
(``s3://``, ``gs://`` with gcsfs, ``memory://``) through fsspec, which webdataset 1.0.2 has no handler for.

We write tars ourselves (fixed mtime/uid/mode) so the same samples always give the same shard bytes, hence a
stable dataset fingerprint.
"""
from __future__ import annotations

import io
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec
import numpy as np
from PIL import Image

from shared.errors import CitUserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
META_NAME = re.compile(r"__[^/]*__($|/)")      # webdataset's tar_file_iterator skip_meta


class ShardError(CitUserError):
    """A shard or a sample in it is malformed; the message names the shard and key."""


def check_key(key: str, where: str = "") -> None:
    """Keys written by us must read back as themselves: non-empty, no dot in the basename (webdataset cuts the key
    at the first dot of the basename), no leading or trailing '/'."""
    base = key.rsplit("/", 1)[-1]
    if not base or "." in base or key.startswith("/"):
        raise ShardError(f"invalid sample key {key!r}{' in ' + where if where else ''}: keys must be non-empty, "
                         "not start with '/', and have no '.' after the last '/' (webdataset cuts keys at the "
                         "first dot of the basename)")


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW or HxWxC -> PNG bytes (deterministic: fixed compression level, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Images: one decode for scan, cache build, training and evaluation

SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def mode_channels(mode: str) -> int:
    """1 for grey modes (with or without alpha, any bit depth), 3 for everything else (RGB, RGBA, P, CMYK, ...)."""
    return 1 if mode in SINGLE_CHANNEL_MODES else 3


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as mode L (channels=1) or RGB (channels=3), deterministically.

    PIL's ``convert`` as timm's loaders use it (``Image.open(...).convert(mode)``): alpha is dropped (not composited),
    palettes are looked up, CMYK uses PIL's fixed formula (no ICC profile), RGB -> L is ITU-R 601 luma, L -> RGB
    repeats the channel.  One exception: 16-bit grey (``I;16*``, e.g. a 16-bit PNG) keeps its high byte
    (v >> 8), where ``convert`` would clip every value above 255 to white.  EXIF orientation is ignored, as timm's
    loaders ignore it: pixels are used in stored order."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.mode in SIXTEEN_BIT_MODES:
        high = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        image = Image.fromarray(high, mode="L")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def open_image(data: bytes, shard: str = "?", key: str = "?") -> Image.Image:
    """Decode image bytes fully in their own mode (so truncated files fail here, naming shard and key)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ShardError(f"cannot decode image of key {key!r} in shard {shard}: {exc}") from exc
    return image


def decode_image(data: bytes, shard: str = "?", key: str = "?", channels: int | None = None) -> Image.Image:
    """Image bytes -> PIL image of mode L or RGB with ``channels`` channels (the manifest's; None: the image's own
    count).  The one decode every stage uses, so the same bytes give the same pixels everywhere."""
    image = open_image(data, shard, key)
    try:
        return to_channels(image, channels or mode_channels(image.mode))
    except (ValueError, OSError) as exc:
        raise ShardError(f"cannot convert the {image.mode} image of key {key!r} in shard {shard} to "
                         f"{channels} channel(s): {exc}") from None


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


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def has_scheme(url: str) -> bool:
    """``s3://b/x``, ``file:///x``, ``pipe:cmd`` have one; a plain path (also ``C:/x``-like one-letter) has not."""
    return len(urlparse(url).scheme) > 1


def open_shard(url: str, storage_options: dict | None = None):
    """A readable binary stream of shard ``url``: webdataset's ``gopen`` for the schemes it knows (paths,
    ``file://``, ``pipe:``, http(s), ...), fsspec for the rest (``s3://`` and other fsspec URLs)."""
    from webdataset.gopen import gopen, gopen_schemes     # here, not above: group_members says why
    scheme = urlparse(url).scheme if has_scheme(url) else ""
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    return fsspec.open(url, "rb", **(storage_options or {})).open()


def _read_at(raw, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a seekable stream, leaving its position where it was (tarfile's stream
    mode only ever calls ``raw.read()``, so it does not notice)."""
    position = raw.tell()
    try:
        raw.seek(offset)
        return raw.read(size)
    finally:
        raw.seek(position)


def tar_members(raw, url: str) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` per regular member of an (uncompressed or compressed) tar stream.

    Our own loop rather than ``webdataset.tariterators.tar_file_iterator``, which silently drops every member that
    is not a regular file: a GNU tar hard link (``tar`` stores the second name of a hard-linked file as a link) would
    lose its sample's field without a word.  Here a hard link to an earlier member is resolved by reading the
    target's bytes again (seekable uncompressed streams: local files, fsspec files) or refused naming the member
    (``pipe:`` streams, compressed tars); symbolic links are refused.  It costs what webdataset's loop costs: a
    2000-member in-memory tar of 1 KiB members, best of 7 ``timeit`` runs on a loaded 2-core machine, took 67 ms
    here and 66 ms with ``tar_file_iterator``."""
    regular: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            name = member.name
            if "/" not in name and name.startswith("__") and name.endswith("__") or META_NAME.match(name):
                continue
            if member.isreg():
                regular[posixpath.normpath(name)] = (member.offset_data, member.size)
                data = tar.extractfile(member).read()
            elif member.islnk():
                data = _hard_link_data(tar, raw, member, regular, url)
            elif member.issym():
                raise ShardError(f"tar member {name!r} in shard {url} is a symbolic link to {member.linkname!r}; "
                                 "webdataset skips links, so its sample would lose this field: write the shard "
                                 "with `tar --dereference` (-h)")
            else:
                continue        # directories and other non-files, as webdataset
            yield {"fname": name, "data": data, "__url__": url}
            tar.members = []    # streaming: do not keep every TarInfo (webdataset does the same)


def _hard_link_data(tar: tarfile.TarFile, raw, member: tarfile.TarInfo, regular: dict, url: str) -> bytes:
    target = posixpath.normpath(member.linkname)
    if target not in regular:
        raise ShardError(f"tar member {member.name!r} in shard {url} is a hard link to {member.linkname!r}, which "
                         "is not an earlier file of the shard; write the shard with `tar --hard-dereference`")
    seekable = getattr(raw, "seekable", lambda: False)()
    if not seekable or getattr(tar.fileobj, "comptype", "tar") != "tar":
        raise ShardError(f"tar member {member.name!r} in shard {url} is a hard link to {member.linkname!r}, which "
                         "cannot be resolved while streaming a pipe or a compressed tar; write the shard with "
                         "`tar --hard-dereference`, or read it from a file")
    return _read_at(raw, *regular[target])


def group_members(members: Iterator[dict], url: str) -> Iterator[dict]:
    """Samples from members, grouped by ``webdataset.tariterators.group_by_keys``; a key met again after another
    key (its members are not adjacent, so webdataset would yield it twice) and a repeated member are named.

    webdataset is imported here, not with this module: its package imports torch (``webdataset.pytorch``), and the
    processes that only write shards (``cit data prepare``'s workers) should not pay 1.5 s for it."""
    from webdataset.tariterators import base_plus_ext, group_by_keys
    seen: set[str] = set()
    try:
        for sample in group_by_keys(members, keys=base_plus_ext, lcase=True):
            key = sample["__key__"]
            if key in seen:
                raise ShardError(f"key {key!r} in shard {url}: its members are not adjacent (other keys' members "
                                 "come between them), so webdataset reads it as two samples; write the shard with "
                                 "each key's members together (e.g. `tar --sort=name`)")
            seen.add(key)
            yield sample
    except ValueError as exc:
        if isinstance(exc, ShardError):
            raise
        name = str(exc.args[0]).split(":", 1)[0] if exc.args else "?"
        raise ShardError(f"tar member {name!r} appears twice in shard {url} (keys must be unique; webdataset cuts "
                         "a key at the first dot of the basename)") from None


def iter_shard(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Stream the samples of one shard in file order, as webdataset groups them (see the module docstring)."""
    try:
        raw = open_shard(url, storage_options)
    except FileNotFoundError:
        raise ShardError(f"shard not found: {url}") from None
    except IsADirectoryError:
        raise ShardError(f"shard {url} is a directory; give the shard files (e.g. {url.rstrip('/')}/*.tar or a "
                         "brace pattern)") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot open shard {url}: {exc}") from None
    try:
        yield from group_members(tar_members(raw, url), url)
        raw.close()                # webdataset's Pipe raises here on a non-zero exit status of the command
    except (tarfile.TarError, EOFError, OSError) as exc:    # OSError: a failing pipe: command, a lost connection
        status = _pipe_status(raw)
        if status:                 # the command's failure explains the broken tar stream
            raise ShardError(f"the command of shard {url} failed with exit status {status} (its own message, if "
                             "any, is printed above)") from None
        what = "unreadable shard" if isinstance(exc, (tarfile.TarError, EOFError)) else "cannot read shard"
        raise ShardError(f"{what} {url}: {exc}") from None
    finally:
        _close_quietly(raw)        # stopped early or failed: the error that matters is already on its way


def _pipe_status(raw) -> int | None:
    """Exit status of a ``pipe:`` command (webdataset's Pipe), waiting for it briefly; None for other streams."""
    proc = getattr(raw, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=10)
    except Exception:              # still running (or already reaped): no status to report
        return getattr(raw, "status", None)


def _close_quietly(raw) -> None:
    try:
        raw.close()
    except Exception:              # a pipe killed by our early close exits non-zero; nothing left to report
        pass


def read_label(sample: dict, shard: str) -> int:
    try:
        return int(sample["cls"].decode().strip())
    except KeyError:
        raise ShardError(f"sample {sample['__key__']!r} in shard {shard} has no 'cls' field") from None
    except ValueError:
        raise ShardError(f"sample {sample['__key__']!r} in shard {shard} has a non-integer 'cls' "
                         f"{sample['cls'][:20]!r}") from None
