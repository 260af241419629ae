"""A reader process for the many-readers tests: reads a cache over and over while another process changes it, checks
every block it reads bit for bit against a reference store (plain zarr: a fresh build of the final cache), and
prints one JSON line of what it saw.

    python -m tests.grow_reader URL REFERENCE STOP_FILE [STORAGE_OPTIONS_JSON [PAUSE_SECONDS]]

Two handles: one opened at the start and kept (a training that opened the cache before the change) and one opened
anew for every read (a training started during the change).  It reads until STOP_FILE exists, then once more.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import zarr

from shared.cache_schema import TEACHER_ARRAYS, CacheError, LogitCache


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def read_and_check(cache: LogitCache, ref: zarr.Group, view: int) -> list[str]:
    """Every array of ``view`` (all rows, one block per array) compared with the reference; the paths that differ."""
    n = cache.attrs.num_samples
    paths = ["params", "digest"] + [f"{t}/{leaf}" for t in cache.teacher_names for leaf in TEACHER_ARRAYS]
    blocks = cache.read_rows(paths, view, 0, n)
    return [f"{p} view {view}" for p, b in zip(paths, blocks)
            if not np.array_equal(_bits(b), _bits(np.asarray(ref[p][view, 0:n])))]


def main(url: str, reference: str, stop: str, options: dict | None, pause: float = 0.05) -> dict:
    ref = zarr.open_group(reference, mode="r")
    held = LogitCache.open(url, storage_options=options)
    report = {"states": [], "reads": 0, "during_change": 0, "refusals": [], "wrong": []}
    print("ready", flush=True)
    while True:
        last = os.path.exists(stop)
        try:
            now = LogitCache.open(url, storage_options=options)
        except CacheError as exc:
            report["refusals"].append(str(exc))
            now = None
        for cache in (held, now):
            if cache is None:
                continue
            state = [cache.attrs.views, cache.teacher_names]
            if cache is now:
                if not report["states"] or report["states"][-1] != state:
                    report["states"].append(state)
                report["during_change"] += bool(cache.attrs.growth)
            report["wrong"] += read_and_check(cache, ref, report["reads"] % cache.attrs.views)
            report["reads"] += 1
        if last:
            return report
        time.sleep(pause)       # a training between steps: leaves the cores (and the S3 server) to the change


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], args[1], args[2], json.loads(args[3]) if len(args) > 3 else None,
                          float(args[4]) if len(args) > 4 else 0.05)), flush=True)
