"""The dataset manifest: shard URLs in order, per-shard sample counts, sha256 and row ranges, classes.

Row = position of a sample in manifest order; the cache is indexed by row.  The manifest digest over *content*
(shard hashes, counts, classes — not URLs) is the dataset fingerprint, so moving shards to S3 keeps it.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field

import fsspec

from shared.errors import CitUserError

MANIFEST_FORMAT = "cit-manifest/1"


class ManifestError(CitUserError):
    """The manifest or the shards it lists are inconsistent; the message names the file."""


@dataclass
class ShardInfo:
    url: str            # relative to the manifest's folder, or an absolute path / fsspec URL
    samples: int
    sha256: str
    start: int = 0      # first row this shard owns; rows are [start, start + samples)

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

    def __post_init__(self) -> None:
        row = 0
        for shard in self.shards:
            shard.start = row
            row += shard.samples

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """sha256 over the content that defines the dataset: shard hashes and counts in order, and classes."""
        content = {"format": MANIFEST_FORMAT, "num_classes": self.num_classes, "class_names": self.class_names,
                   "shards": [[s.sha256, s.samples] for s in self.shards]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def shard_url(self, index: int) -> str:
        """Absolute URL of shard ``index`` (relative URLs resolve against the manifest's folder)."""
        url = self.shards[index].url
        if "://" in url or url.startswith("/") or not self.path:
            return url
        return posixpath.join(posixpath.dirname(self.path), url)

    def shard_of_row(self, row: int) -> int:
        import bisect
        starts = [s.start for s in self.shards]
        return bisect.bisect_right(starts, row) - 1

    def to_json(self) -> str:
        data = {"format": MANIFEST_FORMAT, "name": self.name, "fingerprint": self.fingerprint,
                "num_samples": self.num_samples, "num_classes": self.num_classes, "class_names": self.class_names,
                "shards": [{"url": s.url, "samples": s.samples, "sha256": s.sha256, "rows": [s.start, s.stop]}
                           for s in self.shards],
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
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"manifest {path}: unknown format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
        try:
            shards = [ShardInfo(s["url"], int(s["samples"]), s["sha256"]) for s in data["shards"]]
            manifest = cls(shards, int(data["num_classes"]), list(data["class_names"]), data.get("name", ""),
                           data.get("skipped", []), data.get("source", {}), path)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest {path} is missing field {exc}") from None
        if data.get("fingerprint") and data["fingerprint"] != manifest.fingerprint:
            raise ManifestError(f"manifest {path} was edited: its stored fingerprint does not match its content")
        return manifest


def file_sha256(url: str, storage_options: dict | None = None) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(manifest: Manifest) -> None:
    """Check every listed shard exists and has the recorded sha256 (raises ManifestError naming the shard)."""
    for i, shard in enumerate(manifest.shards):
        url = manifest.shard_url(i)
        try:
            digest = file_sha256(url)
        except FileNotFoundError:
            raise ManifestError(f"shard {url} listed in manifest {manifest.path} does not exist") from None
        if digest != shard.sha256:
            raise ManifestError(f"shard {url} does not match manifest {manifest.path}: sha256 {digest[:12]}… "
                                f"!= recorded {shard.sha256[:12]}… (shard changed after the manifest was made)")
