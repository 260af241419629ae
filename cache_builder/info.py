"""``cit cache info``: what a cache holds and what it costs on disk."""
from __future__ import annotations

import fsspec
import numpy as np

from shared import provenance
from shared.view_spec import ViewSpec
from shared.cache_schema import (FEATURE_ARRAYS, STATUS_COMPLETE, CacheError, normalize_url, open_root,
                                 read_attrs)


def _du(fs, path: str) -> int:
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def cache_info(url: str, storage_options: dict | None = None) -> dict:
    """A JSON-able summary: identity, teachers, completeness, sizes (bytes per view per teacher)."""
    try:
        root = open_root(url, "r", storage_options)
    except Exception as exc:  # noqa: BLE001
        raise CacheError(f"no cit cache at {url}: {exc}") from None
    attrs = read_attrs(root, url)
    try:
        done = np.asarray(root["done"][:attrs.views])     # views beyond E: a change under way (growth)
        units_done = int((done == 1).sum())
    except KeyError:
        units_done = 0
    fs, path = fsspec.core.url_to_fs(normalize_url(url), **(storage_options or {}))
    path = path.rstrip("/")
    total = _du(fs, path)
    e, n = attrs.views - attrs.first_view, attrs.num_samples     # e: the views stored
    teachers = []
    for t in attrs.teachers:
        size = _du(fs, f"{path}/{t.name}")
        arrays = {leaf: _du(fs, f"{path}/{t.name}/{leaf}") for leaf in attrs.teacher_arrays()}
        feature_bytes = sum(arrays.get(leaf, 0) for leaf in FEATURE_ARRAYS)
        teachers.append({"name": t.name, "kind": t.kind, "arch": t.arch, "num_classes": t.num_classes,
                         "test_accuracy": t.test_accuracy, "checkpoint_sha256": t.checkpoint_sha256,
                         "checkpoint": t.extra.get("checkpoint"), "bytes": size,
                         "bytes_per_view": size / (e * n), "feature_dim": t.feature_dim,
                         "feature_bytes_per_view": feature_bytes / (e * n), "bytes_per_view_by_array": {
                             k: v / (e * n) for k, v in arrays.items()}})
    params_bytes = _du(fs, f"{path}/params")
    return {
        "url": url, "format": attrs.format, "status": attrs.status,
        "complete": attrs.status == STATUS_COMPLETE and units_done == attrs.num_units,
        "units_done": units_done, "units_total": attrs.num_units,
        "growth": attrs.growth,
        "dataset_fingerprint": attrs.dataset_fingerprint, "num_samples": n, "num_classes": attrs.num_classes,
        "views": attrs.views, "first_view": attrs.first_view, "topk": attrs.topk,
        "temperatures": attrs.temperatures, "seed": attrs.seed,
        "chunk_rows": attrs.chunk_rows,
        "num_params": ViewSpec.from_dict(attrs.augment).num_params, "augment": attrs.augment, "build": attrs.build,
        "view_code": attrs.view_code, "provenance": attrs.provenance,
        "digest_bytes_per_view": _du(fs, f"{path}/digest") / (e * n),
        "teachers": teachers, "size_bytes": total, "params_bytes": params_bytes,
        "bytes_per_view_per_teacher": (sum(t["bytes"] for t in teachers) / (e * n * len(teachers))
                                       if teachers else 0.0),
        "features": attrs.features,
        "feature_bytes_per_view": sum(t["feature_bytes_per_view"] for t in teachers),
        "bytes_per_view_total": total / (e * n),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_info(info: dict) -> str:
    state = "complete" if info["complete"] else f"INCOMPLETE ({info['status']})"
    lines = [
        f"cache        {info['url']} (format {info['format']})",
        f"status       {state}: {info['units_done']}/{info['units_total']} units (view x chunk) written",
        *([f"growth       a change is under way: {info['growth']['op']} (readers see the cache below until it "
           "finishes)"] if info.get("growth") else []),
        f"dataset      N={info['num_samples']} samples, C={info['num_classes']} classes, "
        f"fingerprint {info['dataset_fingerprint']}",
        f"views        E={info['views']}"
        + (f" (a range: views {info['first_view']}..{info['views'] - 1} only)" if info.get("first_view") else "")
        + f", seed {info['seed']}, {info['num_params']} params per view; "
        f"K={info['topk']}; exact targets at τ = {', '.join(f'{t:g}' for t in info['temperatures'])}; "
        f"chunk {info['chunk_rows']} rows; build {info['build']}",
        f"size         {_size(info['size_bytes'])} on disk; {info['bytes_per_view_per_teacher']:.2f} B per view "
        f"per teacher (targets{' + features' if info.get('features') else ''}), "
        f"{info['bytes_per_view_total']:.2f} B per view in all (incl. params)",
        "features     " + (f"{info['features']}: {info['feature_bytes_per_view']:.2f} B per view (all teachers; "
                            "uint8 codes + per-view scale)" if info.get("features") else
                            "none (`cit cache build --features pooled` stores them)"),
        f"view code    {info['view_code']}; pixel digests {info['digest_bytes_per_view']:.2f} B per view",
        f"built with   {provenance.summary(info['provenance'])}",
        "teachers",
    ]
    for t in info["teachers"]:
        acc = "not measured" if t["test_accuracy"] is None else f"{t['test_accuracy']:.4f}"
        by = ", ".join(f"{k} {v:.2f}" for k, v in t["bytes_per_view_by_array"].items())
        dim = f"; features D={t['feature_dim']}" if t.get("feature_dim") else ""
        lines.append(f"  {t['name']:<12} kind={t['kind']:<5} arch={t['arch']:<18} test acc {acc}; "
                     f"{t['bytes_per_view']:.2f} B/view ({by}){dim}; sha256 {t['checkpoint_sha256'][:12]}")
    return "\n".join(lines)
