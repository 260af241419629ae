"""Loader throughput: read + decode + replay of the augmentation (the default ``ViewSpec``) on Fashion-MNIST.

Two measurements, side by side in one run:

* breakdown per image in one process: tar read, PNG decode, ``sample_view``, ``apply_view``;
* DataLoader throughput with 0, 1 and 2 workers (one intra-op thread each), whole epoch, batch 256:
  images/s including worker start-up, steady-state images/s after the first batch, and images/s per worker.

The machine's load average is recorded because other jobs sharing the cores distort every number.

    python benchmarks/bench_loader.py [--quick] [--out benchmarks/results/loader.json] [--manifest M.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from shared.augment import ViewSpec, apply_view, sample_view
from shared.io import atomic_write_text
from shared.manifest import Manifest
from shared.prepare import DEFAULT_FASHION_MNIST, prepare_fashion_mnist
from shared.reader import ShardStream, seed_worker
from shared.shards import decode_image, image_field


def replay(spec: ViewSpec, image, params) -> torch.Tensor | None:
    """``apply_view``, or None where it raises: some views crash in ``shared.augment`` (PosterizeIncreasing at
    level 10 asks PIL for 0 bits); they are counted and reported instead of aborting the measurement."""
    try:
        return apply_view(spec, image, params)
    except ValueError:
        return None


class ReplayViews(IterableDataset):
    """Shard stream -> (uint8 view, label): the loader work both stages do, without any cache join.
    A view that fails to render is yielded as zeros with label -1 so the main process can count it."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, seed: int = 0, view: int = 0):
        self.stream, self.spec, self.seed, self.view = ShardStream(manifest, seed=seed), spec, seed, view
        self.blank = torch.zeros((1, spec.image_size, spec.image_size), dtype=torch.uint8)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for raw in self.stream:
            image = decode_image(raw.data[image_field(raw.data)], raw.shard_url, raw.key)
            view = replay(self.spec, image, sample_view(self.spec, self.seed, raw.key, self.view))
            yield (self.blank, -1) if view is None else (view, raw.label)


def breakdown(manifest: Manifest, spec: ViewSpec, limit: int) -> dict:
    """Mean microseconds per image of each stage, timed separately in this process."""
    stream = iter(ShardStream(manifest, seed=0, shuffle=False, rank=0, world=1))
    totals = {"read": 0.0, "decode": 0.0, "sample_view": 0.0, "apply_view": 0.0}
    n = failed = 0
    clock = time.perf_counter
    while n < limit:
        t0 = clock()
        try:
            raw = next(stream)
        except StopIteration:
            break
        t1 = clock()
        image = decode_image(raw.data[image_field(raw.data)], raw.shard_url, raw.key)
        t2 = clock()
        params = sample_view(spec, 0, raw.key, 0)
        t3 = clock()
        failed += replay(spec, image, params) is None
        t4 = clock()
        for name, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[name] += dt
        n += 1
    per_image = {name: total / n * 1e6 for name, total in totals.items()}
    per_image["read+decode"] = per_image["read"] + per_image["decode"]
    per_image["total"] = sum(per_image[k] for k in ("read", "decode", "sample_view", "apply_view"))
    return {"images": n, "failed_views": failed, "us_per_image": {k: round(v, 1) for k, v in per_image.items()},
            "images_per_s": round(1e6 / per_image["total"], 1)}


def loader_throughput(manifest: Manifest, spec: ViewSpec, workers: int, batch_size: int) -> dict:
    loader = DataLoader(ReplayViews(manifest, spec), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=seed_worker if workers else None, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    images, failed, first, first_images = 0, 0, None, 0
    for views, labels in loader:
        images += len(labels)
        failed += int((labels < 0).sum())
        if first is None:
            first, first_images = time.perf_counter(), images
    end = time.perf_counter()
    if images != manifest.num_samples:
        raise RuntimeError(f"loader yielded {images} images, manifest has {manifest.num_samples}")
    steady = (images - first_images) / (end - first) if end > first else float("nan")
    processes = max(workers, 1)
    return {"workers": workers, "images": images, "failed_views": failed, "seconds": round(end - start, 3),
            "images_per_s": round(images / (end - start), 1), "steady_images_per_s": round(steady, 1),
            "steady_images_per_s_per_worker": round(steady / processes, 1),
            "startup_s": round(first - start, 3)}


def dataset(args: argparse.Namespace) -> Manifest:
    if args.manifest:
        return Manifest.load(args.manifest)
    per_class = 300 if args.quick else None
    out = os.path.join(args.data_dir, "quick" if args.quick else "full")
    return prepare_fashion_mnist(args.source, out, shard_size=5000 if not args.quick else 1000,
                                 per_class=per_class)["train"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    parser.add_argument("--quick", action="store_true", help="3000-image subset (< 1 min)")
    parser.add_argument("--manifest", default=None, help="existing manifest to read (default: Fashion-MNIST train)")
    parser.add_argument("--source", default=DEFAULT_FASHION_MNIST, help="Fashion-MNIST IDX folder")
    parser.add_argument("--data-dir", default="/tmp/cit-bench-fmnist", help="where to prepare Fashion-MNIST")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    manifest = dataset(args)
    spec = ViewSpec()
    load_before = os.getloadavg()
    parts = breakdown(manifest, spec, limit=2000 if args.quick else 10000)
    runs = [loader_throughput(manifest, spec, int(w), args.batch_size) for w in args.workers.split(",")]
    result = {
        "benchmark": "loader", "quick": args.quick,
        "dataset": {"manifest": manifest.path, "fingerprint": manifest.fingerprint, "samples": manifest.num_samples,
                    "shards": len(manifest.shards)},
        "spec": spec.to_dict(), "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "breakdown": parts, "dataloader": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))

    us = parts["us_per_image"]
    print(f"dataset {manifest.path}: {manifest.num_samples} images; load average {load_before[0]:.2f} -> "
          f"{result['machine']['loadavg_after'][0]:.2f} on {os.cpu_count()} cpus")
    print(f"per image (1 process, {parts['images']} images): read {us['read']:.1f} us  decode {us['decode']:.1f} us  "
          f"sample_view {us['sample_view']:.1f} us  apply_view {us['apply_view']:.1f} us  "
          f"= {us['total']:.1f} us ({parts['images_per_s']:.0f} img/s)")
    print(f"{'workers':>7} {'images':>7} {'seconds':>8} {'img/s':>9} {'steady img/s':>13} {'per worker':>11} "
          f"{'startup s':>10} {'failed':>7}")
    for r in runs:
        print(f"{r['workers']:>7} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.0f} "
              f"{r['steady_images_per_s']:>13.0f} {r['steady_images_per_s_per_worker']:>11.0f} {r['startup_s']:>10.2f} "
              f"{r['failed_views']:>7}")
    if any(r["failed_views"] for r in runs) or parts["failed_views"]:
        print("WARNING: some views raised in apply_view (shared.augment PosterizeIncreasing at level 10 -> 0 bits)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
