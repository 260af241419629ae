"""The dataset manifest: shard URLs in order, per-shard sample counts, sizes, sha256 and row ranges, classes,
the images' channel count, and the samples a scan skipped.

Row = position of a sample in manifest order; the cache is indexed by row.  The manifest digest over *content* —
everything that decides which rows exist and what they hold (shard hashes, counts, skipped samples, classes,
channels), not URLs — is the dataset fingerprint, so moving shards to S3 keeps it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field

import fsspec

from shared.errors import CitUserError

MANIFEST_FORMAT = "cit-manifest/2"
OLD_FORMATS = ("cit-manifest/1",)     # read (channels from source.channels); fingerprinted as format 2

log = logging.getLogger(__name__)


class ManifestError(CitUserError):
    """The manifest or the shards it lists are inconsistent; the message names the file."""


@dataclass
class ShardInfo:
    url: str            # relative to the manifest's folder, or an absolute path / fsspec URL / pipe: command
    samples: int
    sha256: str
    start: int = 0      # first row this shard owns; rows are [start, start + samples)
    size: int | None = None   # bytes (checked at train start); None in manifests written before it was recorded

    @property
    def stop(self) -> int:
        return self.start + self.samples


@dataclass
class Manifest:
    shards: list[ShardInfo]
    num_classes: int
    class_names: list[str]
    name: str = ""
    skipped: list[dict] = field(default_factory=list)   # [{"shard": url, "key": key, "reason": str}]
    source: dict = field(default_factory=dict)          # how it was made (informational, not fingerprinted)
    path: str = ""                                      # where it was loaded from (not serialised)
    channels: int | None = None                         # 1 (L) or 3 (RGB): every image is decoded to this
    _skipped_index: tuple = field(default=(-1, {}), init=False, repr=False, compare=False)

    def skipped_keys(self, shard_url: str) -> frozenset:
        """The keys of shard ``shard_url`` the manifest lists as skipped, from an index built once (a subset
        manifest lists every left-out row: scanning that list per piece would cost O(dataset) per piece)."""
        if self._skipped_index[0] != len(self.skipped):
            index: dict[str, set] = {}
            for s in self.skipped:
                index.setdefault(s.get("shard"), set()).add(s["key"])
            self._skipped_index = (len(self.skipped), {url: frozenset(keys) for url, keys in index.items()})
        return self._skipped_index[1].get(shard_url, frozenset())

    def __post_init__(self) -> None:
        row = 0
        for shard in self.shards:
            shard.start = row
            row += shard.samples

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def _skipped_content(self) -> list[list]:
        index = {s.url: i for i, s in enumerate(self.shards)}
        return [[index.get(s.get("shard"), s.get("shard")), s.get("key")] for s in self.skipped]

    @property
    def fingerprint(self) -> str:
        """sha256 over the content that defines the dataset: shard hashes and counts in order, the skipped samples
        (by shard position and key), classes and channels."""
        content = {"format": MANIFEST_FORMAT, "num_classes": self.num_classes, "class_names": self.class_names,
                   "channels": self.channels, "shards": [[s.sha256, s.samples] for s in self.shards],
                   "skipped": self._skipped_content()}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def fingerprint_v1(self) -> str:
        """The fingerprint a format-1 manifest stored (counts and classes only), to check such a file."""
        content = {"format": "cit-manifest/1", "num_classes": self.num_classes, "class_names": self.class_names,
                   "shards": [[s.sha256, s.samples] for s in self.shards]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def require_channels(self) -> int:
        """The channel count every image is decoded to — a contract, so a manifest without one is refused."""
        if self.channels not in (1, 3):
            raise ManifestError(f"manifest {self.path or self.name} records no valid channel count "
                                f"({self.channels!r}); rescan its shards with `cit data prepare scan --force`")
        return self.channels

    def shard_url(self, index: int) -> str:
        """Absolute URL of shard ``index`` (relative paths resolve against the manifest's folder)."""
        from shared.shards import has_scheme
        url = self.shards[index].url
        if has_scheme(url) or url.startswith("/") or not self.path:
            return url
        return posixpath.join(posixpath.dirname(self.path), url)

    def shard_of_row(self, row: int) -> int:
        import bisect
        starts = [s.start for s in self.shards]
        return bisect.bisect_right(starts, row) - 1

    def to_json(self) -> str:
        data = {"format": MANIFEST_FORMAT, "name": self.name, "fingerprint": self.fingerprint,
                "num_samples": self.num_samples, "num_classes": self.num_classes, "class_names": self.class_names,
                "channels": self.channels,
                "shards": [{"url": s.url, "samples": s.samples, "sha256": s.sha256, "rows": [s.start, s.stop],
                            **({"size": s.size} if s.size is not None else {})} for s in self.shards],
                "skipped": self.skipped, "source": self.source}
        return json.dumps(data, indent=1)

    def save(self, path: str) -> None:
        """Write atomically: a manifest is what makes a folder of shards a dataset, so never leave half of one."""
        from shared.io import atomic_write_text
        atomic_write_text(path, self.to_json())
        self.path = path

    @classmethod
    def load(cls, path: str) -> "Manifest":
        try:
            with fsspec.open(path, "r") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ManifestError(f"manifest not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
        version = data.get("format") if isinstance(data, dict) else None
        if version != MANIFEST_FORMAT and version not in OLD_FORMATS:
            raise ManifestError(f"manifest {path}: unknown format {version!r}, expected {MANIFEST_FORMAT}")
        try:
            shards = [ShardInfo(s["url"], int(s["samples"]), s["sha256"],
                                size=int(s["size"]) if s.get("size") is not None else None) for s in data["shards"]]
            source = data.get("source", {})
            channels = data["channels"] if version == MANIFEST_FORMAT else source.get("channels")
            manifest = cls(shards, int(data["num_classes"]), list(data["class_names"]), data.get("name", ""),
                           data.get("skipped", []), source, path, channels)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {path} is missing or has a malformed field {exc}") from None
        check_consistent(manifest, data, version)
        return manifest


def check_consistent(manifest: Manifest, data: dict, version: str) -> None:
    """What a hand edit breaks: the stored fingerprint, the total and per-shard row ranges, skipped shard names."""
    path = manifest.path
    stored = data.get("fingerprint")
    expected = manifest.fingerprint if version == MANIFEST_FORMAT else manifest.fingerprint_v1()
    if version == MANIFEST_FORMAT and not stored:
        raise ManifestError(f"manifest {path} has no fingerprint; it was edited or not written by cit: rescan")
    if stored and stored != expected:
        raise ManifestError(f"manifest {path} was edited: its stored fingerprint does not match its content "
                            "(counts, skipped samples, classes, channels, shard hashes); rescan the shards")
    if "num_samples" in data and data["num_samples"] != manifest.num_samples:
        raise ManifestError(f"manifest {path} was edited: num_samples={data['num_samples']} but its shards hold "
                            f"{manifest.num_samples} rows; rescan the shards")
    for i, (shard, entry) in enumerate(zip(manifest.shards, data["shards"])):
        if "rows" in entry and list(entry["rows"]) != [shard.start, shard.stop]:
            raise ManifestError(f"manifest {path} was edited: shard {i} ({shard.url}) says rows {entry['rows']} "
                                f"but its counts give [{shard.start}, {shard.stop}]; rescan the shards")
    urls = {s.url for s in manifest.shards}
    for entry in manifest.skipped:
        if entry.get("shard") not in urls:
            raise ManifestError(f"manifest {path}: skipped sample {entry.get('key')!r} names shard "
                                f"{entry.get('shard')!r}, which the manifest does not list")


def file_sha256(url: str, storage_options: dict | None = None) -> str:
    return stream_digest(url, storage_options)[0]


def stream_digest(url: str, storage_options: dict | None = None) -> tuple[str, int]:
    """(sha256, bytes) of a shard read as the readers read it (paths, fsspec URLs, ``pipe:`` commands)."""
    from shared.shards import open_shard
    digest, size = hashlib.sha256(), 0
    stream = open_shard(url, storage_options)
    try:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    finally:
        stream.close()
    return digest.hexdigest(), size


def _stat_size(url: str) -> int | None:
    """The shard's size in bytes; None when only reading it could tell (a ``pipe:`` command)."""
    from shared.shards import is_pipe
    if is_pipe(url):
        return None
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)          # FileNotFoundError when missing
    if info.get("type") == "directory":
        raise IsADirectoryError(path)
    return int(info["size"])


def check_shards(manifest: Manifest, *, sha256: bool = True, count: bool = False) -> None:
    """Every listed shard exists and has its recorded size; with ``sha256`` also its recorded hash; with ``count``
    also its recorded number of samples (after the skipped ones).  Raises ManifestError naming the shard.

    ``pipe:`` shards have no size to look up: they are checked (by reading) only with ``sha256`` or ``count``."""
    where = manifest.path or manifest.name
    for i, shard in enumerate(manifest.shards):
        url = manifest.shard_url(i)
        try:
            size = _stat_size(url)
            if sha256:
                digest, size = stream_digest(url)
        except FileNotFoundError:
            raise ManifestError(f"shard {url} listed in manifest {where} does not exist") from None
        except IsADirectoryError:
            raise ManifestError(f"shard {url} listed in manifest {where} is a folder, not a tar file") from None
        except OSError as exc:
            raise ManifestError(f"shard {url} listed in manifest {where} cannot be read: {exc}") from None
        if size is not None and shard.size is not None and size != shard.size:
            raise ManifestError(f"shard {url} has {size} bytes but manifest {where} records {shard.size} "
                                "(truncated or replaced after the manifest was made); restore it or rescan")
        if sha256 and digest != shard.sha256:
            raise ManifestError(f"shard {url} does not match manifest {where}: sha256 {digest[:12]}… "
                                f"!= recorded {shard.sha256[:12]}… (shard changed after the manifest was made)")
        if count:
            check_count(manifest, i, url)


def check_count(manifest: Manifest, index: int, url: str) -> None:
    """Shard ``index`` holds its recorded number of samples plus exactly the skipped keys the manifest lists."""
    from shared.shards import iter_shard
    shard = manifest.shards[index]
    skipped = manifest.skipped_keys(shard.url)
    keys = [sample["__key__"] for sample in iter_shard(url)]
    found = len(keys) - len(skipped & set(keys))
    missing = sorted(skipped - set(keys))
    if found != shard.samples or missing:
        detail = f"skipped key {missing[0]!r} is not in it" if missing else f"it holds {found} samples"
        raise ManifestError(f"shard {url} does not match manifest {manifest.path or manifest.name}: the manifest "
                            f"records {shard.samples} samples but {detail} (manifest edited?); rescan the shards")


def verify_shards(manifest: Manifest) -> None:
    """Check every listed shard exists and has the recorded size and sha256 (raises ManifestError naming it)."""
    check_shards(manifest, sha256=True)
