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
import resource
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


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader workers, joined at the end of an epoch)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class ReplayViews(IterableDataset):
    """Shard stream -> (uint8 view, label): the loader work both stages do, without any cache join."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, seed: int = 0, view: int = 0):
        self.stream, self.spec, self.seed, self.view = ShardStream(manifest, seed=seed), spec, seed, view

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for raw in self.stream:
            image = decode_image(raw.data[image_field(raw.data)], raw.shard_url, raw.key)
            yield apply_view(self.spec, image, sample_view(self.spec, self.seed, raw.key, self.view)), raw.label


def breakdown(manifest: Manifest, spec: ViewSpec, limit: int | None = None) -> dict:
    """CPU and wall microseconds per image of each stage, timed separately in this process.  CPU time is the number
    to trust when other jobs share the cores; wall time is what an idle core would see."""
    stream = iter(ShardStream(manifest, seed=0, shuffle=False, rank=0, world=1))
    stages = ("read", "decode", "sample_view", "apply_view")
    cpu, wall = dict.fromkeys(stages, 0.0), dict.fromkeys(stages, 0.0)
    n = 0
    while limit is None or n < limit:
        marks = [(time.process_time(), time.perf_counter())]
        raw = next(stream, None)
        if raw is None:
            break
        marks.append((time.process_time(), time.perf_counter()))
        image = decode_image(raw.data[image_field(raw.data)], raw.shard_url, raw.key)
        marks.append((time.process_time(), time.perf_counter()))
        params = sample_view(spec, 0, raw.key, 0)
        marks.append((time.process_time(), time.perf_counter()))
        apply_view(spec, image, params)
        marks.append((time.process_time(), time.perf_counter()))
        for stage, (c0, w0), (c1, w1) in zip(stages, marks, marks[1:]):
            cpu[stage] += c1 - c0
            wall[stage] += w1 - w0
        n += 1
    cpu["total"], wall["total"] = sum(cpu.values()), sum(wall.values())
    return {"images": n, "cpu_us_per_image": {s: round(t / n * 1e6, 1) for s, t in cpu.items()},
            "wall_us_per_image": {s: round(t / n * 1e6, 1) for s, t in wall.items()},
            "images_per_cpu_second": round(n / cpu["total"], 2), "images_per_wall_second": round(n / wall["total"], 2)}


def loader_throughput(manifest: Manifest, spec: ViewSpec, workers: int, batch_size: int) -> dict:
    """One DataLoader epoch: wall images/s (whole, and steady after the first batch), and images per CPU-second
    of the main process and its workers together."""
    loader = DataLoader(ReplayViews(manifest, spec), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=seed_worker if workers else None, prefetch_factor=4 if workers else None)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    images, first, first_images = 0, None, 0
    for views, labels in loader:
        images += len(labels)
        if first is None:
            first, first_images = time.perf_counter(), images
    end = time.perf_counter()
    del loader                                           # join the workers: their CPU time is then counted
    cpu = cpu_seconds() - cpu_start
    if images != manifest.num_samples:
        raise RuntimeError(f"loader yielded {images} images, manifest has {manifest.num_samples}")
    steady = (images - first_images) / (end - first) if end > first else float("nan")
    processes = max(workers, 1)
    return {"workers": workers, "images": images, "seconds": round(end - start, 3),
            "images_per_s": round(images / (end - start), 1), "steady_images_per_s": round(steady, 1),
            "steady_images_per_s_per_worker": round(steady / processes, 1),
            "startup_s": round(first - start, 3), "cpu_seconds": round(cpu, 3),
            "images_per_cpu_second": round(images / cpu, 2), "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def dataset(args: argparse.Namespace) -> Manifest:
    if args.manifest:
        return Manifest.load(args.manifest)
    per_class = 20 if args.quick else None
    out = os.path.join(args.data_dir, "quick" if args.quick else "full")
    return prepare_fashion_mnist(args.source, out, shard_size=5000 if not args.quick else 50,
                                 per_class=per_class)["train"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    parser.add_argument("--quick", action="store_true", help="200-image subset, batch 32 (seconds)")
    parser.add_argument("--manifest", default=None, help="existing manifest to read (default: Fashion-MNIST train)")
    parser.add_argument("--source", default=DEFAULT_FASHION_MNIST, help="Fashion-MNIST IDX folder")
    parser.add_argument("--data-dir", default="/tmp/cit-bench-fmnist", help="where to prepare Fashion-MNIST")
    parser.add_argument("--batch-size", type=int, default=None, help="[256; quick 32]")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.batch_size is None:
        args.batch_size = 32 if args.quick else 256
    manifest = dataset(args)
    spec = ViewSpec()
    load_before = os.getloadavg()
    parts = breakdown(manifest, spec, limit=200 if args.quick else 10000)
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

    us = parts["cpu_us_per_image"]
    print(f"dataset {manifest.path}: {manifest.num_samples} images; load average {load_before[0]:.2f} -> "
          f"{result['machine']['loadavg_after'][0]:.2f} on {os.cpu_count()} cpus")
    print(f"CPU per image (1 process, {parts['images']} images): read {us['read']:.1f} us  decode {us['decode']:.1f} us"
          f"  sample_view {us['sample_view']:.1f} us  apply_view {us['apply_view']:.1f} us  "
          f"= {us['total']:.1f} us ({parts['images_per_cpu_second']:.0f} images per CPU-second)")
    print(f"{'workers':>7} {'images':>7} {'seconds':>8} {'img/s':>9} {'steady img/s':>13} {'per worker':>11} "
          f"{'startup s':>10} {'img/CPU-s':>10}")
    for r in runs:
        print(f"{r['workers']:>7} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.0f} "
              f"{r['steady_images_per_s']:>13.0f} {r['steady_images_per_s_per_worker']:>11.0f} {r['startup_s']:>10.2f} "
              f"{r['images_per_cpu_second']:>10.0f}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
