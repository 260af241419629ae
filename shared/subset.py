"""Subsets of a dataset that keep using its shards, and the row map that lets them train from the full data's cache.

A subset manifest lists the *same* shards as its superset; the rows it leaves out are listed as skipped
(reason ``"subset"``), so every reader skips them as it skips bad samples, and its fingerprint is its own.
``source.subset`` records where it came from (the superset's fingerprint and path, the rule and its seed).

A cache built on the superset serves the subset through ``cache_rows``: each subset row is mapped, by sample key,
to its superset row.  The relation is checked, not assumed: every shard of the subset must be a shard of the
superset (same sha256) and every key of the subset must be a row of the superset, else the first offending key is
named.  Inside one shard both manifests keep file order, so a subset piece maps to an increasing set of superset
rows: the trainer reads their covering block once and keeps the rows it needs.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import numpy as np

from shared.errors import CitUserError
from shared.manifest import Manifest, ManifestError, ShardInfo
from shared.shards import has_scheme, iter_shard, read_label

SUBSET_REASON = "subset"


class SubsetError(CitUserError):
    """A subset rule that cannot be met, or a manifest that is not a subset of the cache's; the message says which."""


@dataclass
class SubsetRule:
    """Exactly one of ``per_class`` / ``fraction`` / ``classes``; ``seed`` draws the rows (per_class, fraction)."""
    per_class: int | None = None
    fraction: float | None = None
    classes: tuple[int, ...] | None = None
    seed: int = 0

    def check(self) -> None:
        given = [x is not None for x in (self.per_class, self.fraction, self.classes)]
        if sum(given) != 1:
            raise SubsetError("give exactly one of --per-class N, --fraction F, --classes C1,C2,...")
        if self.per_class is not None and self.per_class < 1:
            raise SubsetError(f"--per-class must be >= 1, got {self.per_class}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SubsetError(f"--fraction must be in (0, 1], got {self.fraction}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if v is not None}


def shard_keys(manifest: Manifest, index: int) -> list[str]:
    """The keys of shard ``index`` that are rows of ``manifest`` (file order, skipped keys left out)."""
    return _rows_of(manifest, index, [s["__key__"] for s in iter_shard(manifest.shard_url(index))])


def _rows_of(manifest: Manifest, index: int, keys_in_file: list[str]) -> list[str]:
    skipped = manifest.skipped_keys(manifest.shards[index].url)
    return [k for k in keys_in_file if k not in skipped]


def _rows_with_labels(manifest: Manifest) -> tuple[list[tuple[int, str]], np.ndarray]:
    """[(shard index, key)] and the labels of every row, in row order (one pass over the shards)."""
    rows, labels = [], []
    for index, shard in enumerate(manifest.shards):
        url = manifest.shard_url(index)
        skipped = manifest.skipped_keys(shard.url)
        for sample in iter_shard(url):
            if sample["__key__"] not in skipped:
                rows.append((index, sample["__key__"]))
                labels.append(read_label(sample, url))
    return rows, np.asarray(labels, dtype=np.int64)


def choose_rows(labels: np.ndarray, rule: SubsetRule, num_classes: int) -> np.ndarray:
    """Sorted row indices the rule keeps: a pure function of (labels, rule) — the same subset on every machine."""
    rule.check()
    rng = np.random.default_rng([rule.seed, 0x5B5E7])
    if rule.classes is not None:
        bad = [c for c in rule.classes if not 0 <= c < num_classes]
        if bad:
            raise SubsetError(f"--classes: class {bad[0]} is not in 0..{num_classes - 1}")
        return np.flatnonzero(np.isin(labels, list(rule.classes)))
    if rule.fraction is not None:
        count = max(1, int(round(rule.fraction * len(labels))))
        return np.sort(rng.permutation(len(labels))[:count])
    keep = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < rule.per_class:
            raise SubsetError(f"--per-class {rule.per_class}: class {c} has only {len(rows)} rows")
        keep.append(rng.permutation(rows)[:rule.per_class])
    return np.sort(np.concatenate(keep))


def subset_manifest(manifest_path: str, rule: SubsetRule, out: str) -> Manifest:
    """Write the manifest of the rows ``rule`` keeps (same shards) to ``out``; refuses to overwrite another file."""
    try:
        manifest = Manifest.load(manifest_path)
    except ManifestError as exc:
        raise SubsetError(str(exc)) from None
    rule.check()
    rows, labels = _rows_with_labels(manifest)
    kept = set(choose_rows(labels, rule, manifest.num_classes).tolist())
    urls = [_relocate(manifest.shard_url(i), out) for i in range(len(manifest.shards))]
    renamed = {s.url: urls[i] for i, s in enumerate(manifest.shards)}
    counts = [0] * len(manifest.shards)
    skipped = [{**s, "shard": renamed.get(s.get("shard"), s.get("shard"))} for s in manifest.skipped]
    for row, (index, key) in enumerate(rows):
        if row in kept:
            counts[index] += 1
        else:
            skipped.append({"shard": urls[index], "key": key, "reason": SUBSET_REASON})
    shards = [ShardInfo(urls[i], counts[i], s.sha256, size=s.size) for i, s in enumerate(manifest.shards)]
    source = {"subset": {"of": manifest.fingerprint, "manifest": os.path.abspath(manifest_path)
                         if not has_scheme(manifest_path) else manifest_path, "rule": rule.to_dict(),
                         "rows": len(kept)}}
    subset = Manifest(shards, manifest.num_classes, list(manifest.class_names), f"{manifest.name}-subset", skipped,
                      source, channels=manifest.channels)
    subset.save(out)
    return subset


def _relocate(url: str, out: str) -> str:
    """A shard URL as seen from the folder of the manifest ``out`` (relative when both are local paths)."""
    if has_scheme(url) or has_scheme(out):
        return url
    return posixpath.relpath(os.path.abspath(url), os.path.dirname(os.path.abspath(out)))


@dataclass
class CacheRows:
    """How a training manifest's rows find their cache rows: ``rows[i]`` is the cache row of training row i."""
    cache_manifest: Manifest          # the manifest the cache was built for
    rows: np.ndarray | None           # None: the same manifest (identity)

    def record(self) -> dict:
        """What the run records about the relation."""
        if self.rows is None:
            return {"relation": "same", "fingerprint": self.cache_manifest.fingerprint}
        return {"relation": "subset", "cache_dataset": self.cache_manifest.fingerprint,
                "cache_manifest": self.cache_manifest.path, "rows": int(len(self.rows))}


def superset_rows(subset: Manifest, superset: Manifest) -> np.ndarray:
    """Row of ``superset`` of every row of ``subset``, by key; raises naming the first key that is not a superset
    row (a shard of the subset that the superset does not list, or a key the superset skips)."""
    by_sha = {s.sha256: i for i, s in enumerate(superset.shards)}
    rows = np.empty(subset.num_samples, dtype=np.int64)
    for index, shard in enumerate(subset.shards):
        if shard.samples == 0:
            continue
        in_file = [s["__key__"] for s in iter_shard(subset.shard_url(index))]   # one read serves both manifests
        keys = _rows_of(subset, index, in_file)
        sup = by_sha.get(shard.sha256)             # the same sha256: the same file, maybe other skipped keys
        where = {} if sup is None else {k: superset.shards[sup].start + j
                                         for j, k in enumerate(_rows_of(superset, sup, in_file))}
        for j, key in enumerate(keys):
            row = where.get(key)
            if row is None:
                raise SubsetError(f"sample {key!r} of shard {subset.shard_url(index)} in {subset.path} is not a row "
                                  f"of {superset.path}, the manifest the cache was built for: {subset.path} is "
                                  "not a subset of it")
            rows[shard.start + j] = row
    return rows


def cache_rows(manifest: Manifest, cache_fingerprint: str, cache_data: str = "") -> CacheRows:
    """The training manifest itself when the cache was built for it; else the superset manifest (``cache_data``,
    or the one a ``cit data subset`` manifest records) and the checked row map."""
    if manifest.fingerprint == cache_fingerprint:
        return CacheRows(manifest, None)
    path = cache_data or manifest.source.get("subset", {}).get("manifest", "")
    if not path:
        return CacheRows(manifest, None)     # the caller's fingerprint check names the mismatch
    try:
        superset = Manifest.load(path)
    except ManifestError as exc:
        raise SubsetError(f"the manifest the cache was built for: {exc}") from None
    if superset.fingerprint != cache_fingerprint:
        raise SubsetError(f"{path} is dataset {superset.fingerprint[:12]}…, the cache was built for "
                          f"{cache_fingerprint[:12]}…; pass the manifest the cache was built from (--cache-data)")
    if superset.num_classes != manifest.num_classes or superset.class_names != manifest.class_names:
        raise SubsetError(f"{manifest.path} and {path} have different classes; not a subset")
    return CacheRows(superset, superset_rows(manifest, superset))
