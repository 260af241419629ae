"""Loader throughput: read + decode + replay of the augmentation (the default ``ViewSpec``) on Fashion-MNIST.

Two measurements, side by side in one run:

* breakdown per image in one process: tar read, PNG decode, ``sample_view``, ``apply_view``, and the trainer's
  replay check (params record compare + crc32 pixel digest, ``shared.views.view_mismatch``);
* the replay check at 224 px (synthetic JPEGs, the DeiT recipe), the digest candidates' cost at 28 and 224 px,
  and the stored digest's bytes per view (the cache's codec on the real digests);
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

import hashlib
import io
import zlib

import numpy as np
from PIL import Image

from shared.augment import ViewSpec, apply_view, sample_view
from shared.views import RenderedView, view_mismatch
from shared.io import atomic_write_text
from shared.manifest import Manifest
from shared.prepare import DEFAULT_FASHION_MNIST, prepare_fashion_mnist
from shared.reader import ShardStream, decode_raw, seed_worker


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
            image = decode_raw(raw)
            yield apply_view(self.spec, image, sample_view(self.spec, self.seed, raw.key, self.view)), raw.label


def breakdown(manifest: Manifest, spec: ViewSpec, limit: int | None = None) -> dict:
    """CPU and wall microseconds per image of each stage, timed separately in this process.  CPU time is the number
    to trust when other jobs share the cores; wall time is what an idle core would see."""
    stream = iter(ShardStream(manifest, seed=0, shuffle=False, rank=0, world=1))
    stages = ("read", "decode", "sample_view", "apply_view", "check")
    cpu, wall = dict.fromkeys(stages, 0.0), dict.fromkeys(stages, 0.0)
    n = 0
    digests = []
    while limit is None or n < limit:
        marks = [(time.process_time(), time.perf_counter())]
        raw = next(stream, None)
        if raw is None:
            break
        marks.append((time.process_time(), time.perf_counter()))
        image = decode_raw(raw)
        marks.append((time.process_time(), time.perf_counter()))
        params = sample_view(spec, 0, raw.key, 0)
        marks.append((time.process_time(), time.perf_counter()))
        pixels = apply_view(spec, image, params)
        marks.append((time.process_time(), time.perf_counter()))
        record = params.encode(spec)          # the rendered record and what the cache holds: not timed
        rendered, stored, stored_pixels = RenderedView(pixels.numpy(), record), record.copy(), stored_digest(pixels)
        marks.append((time.process_time(), time.perf_counter()))
        if view_mismatch(0, raw, rendered, stored, stored_pixels) is not None:
            raise RuntimeError("the replay check failed on its own view")
        marks.append((time.process_time(), time.perf_counter()))
        digests.append(stored_pixels)
        intervals = list(zip(marks, marks[1:]))
        del intervals[4]                      # the untimed preparation
        for stage, ((c0, w0), (c1, w1)) in zip(stages, intervals):
            cpu[stage] += c1 - c0
            wall[stage] += w1 - w0
        n += 1
    cpu["total"], wall["total"] = sum(cpu.values()), sum(wall.values())
    return {"images": n, "check_fraction_of_loader_cpu": round(cpu["check"] / cpu["total"], 5),
            "digest_bytes_per_view": digest_bytes(np.asarray(digests, np.uint32)),
            "cpu_us_per_image": {s: round(t / n * 1e6, 1) for s, t in cpu.items()},
            "wall_us_per_image": {s: round(t / n * 1e6, 1) for s, t in wall.items()},
            "images_per_cpu_second": round(n / cpu["total"], 2), "images_per_wall_second": round(n / wall["total"], 2)}


def stored_digest(pixels) -> int:
    """What the cache would hold for this view (computed outside the timed check: a read, not a computation)."""
    return zlib.crc32(pixels.numpy())


def digest_bytes(digests: np.ndarray) -> float:
    """Bytes per view of ``digests`` stored as the cache stores them (the schema's codec, 4096-row chunks)."""
    import zarr
    from shared.cache_schema import _codecs
    store = zarr.storage.MemoryStore()
    array = zarr.create_array(store, shape=(1, len(digests)), chunks=(1, 4096), dtype=np.uint32, fill_value=0,
                              **_codecs(np.dtype(np.uint32)))
    array[0] = digests
    size = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
    return round(size / len(digests), 3)


DIGEST_CANDIDATES = {
    "crc32": lambda b: zlib.crc32(b), "adler32": lambda b: zlib.adler32(b),
    "blake2b-8": lambda b: hashlib.blake2b(b, digest_size=8).digest(), "sha1": lambda b: hashlib.sha1(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(), "md5": lambda b: hashlib.md5(b).digest(),
}


def digest_candidates(repeats: int) -> dict:
    """CPU microseconds per view of each candidate digest on 28 px grey and 224 px RGB uint8 views."""
    out = {}
    for name, shape in (("28px_grey", (1, 28, 28)), ("224px_rgb", (3, 224, 224))):
        view = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        buf = memoryview(view.reshape(-1))
        out[name] = {}
        for cand, fn in DIGEST_CANDIDATES.items():
            best = float("inf")
            for _ in range(3):
                t0 = time.process_time()
                for _ in range(repeats):
                    fn(buf)
                best = min(best, (time.process_time() - t0) / repeats)
            out[name][cand] = round(best * 1e6, 2)
    return out


def check_at_224(images: int) -> dict:
    """The replay check against the loader's CPU per view at 224 px (DeiT recipe, bicubic) on synthetic JPEGs
    sized like ImageNet's (about 500 x 375): decode + sample_view + apply_view vs the check."""
    spec = ViewSpec(image_size=224, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(min(images, 16)):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        buf = io.BytesIO()
        picture.save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    loader = check = 0.0

    class Raw:
        key, row, shard_url = "k", 0, "synthetic"
    for i in range(images):
        t0 = time.process_time()
        image = Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB")
        params = sample_view(spec, 0, f"img{i}", 0)
        pixels = apply_view(spec, image, params)
        t1 = time.process_time()
        record = params.encode(spec)
        rendered, stored_record, stored = RenderedView(pixels.numpy(), record), record.copy(), stored_digest(pixels)
        t2 = time.process_time()
        if view_mismatch(0, Raw(), rendered, stored_record, stored) is not None:
            raise RuntimeError("the replay check failed on its own view")
        t3 = time.process_time()
        loader += t1 - t0 + t3 - t2
        check += t3 - t2
    return {"images": images, "loader_cpu_us_per_view": round(loader / images * 1e6, 1),
            "check_cpu_us_per_view": round(check / images * 1e6, 1),
            "check_fraction_of_loader_cpu": round(check / loader, 5)}


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
                                 per_class=per_class, workers=1 if args.quick else None)["train"]


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
    digest = {"function": "zlib.crc32 of the uint8 (C, H, W) view", "bytes_per_view": parts["digest_bytes_per_view"],
              "check_fraction_28px": parts["check_fraction_of_loader_cpu"],
              "check_224px": check_at_224(20 if args.quick else 400),
              "candidates_cpu_us_per_view": digest_candidates(50 if args.quick else 1000)}
    # the build computes the digest (no compare) once per rendered view; its teachers are not counted here
    crc = digest["candidates_cpu_us_per_view"]
    render_28 = sum(parts["cpu_us_per_image"][s] for s in ("read", "decode", "sample_view", "apply_view"))
    render_224 = digest["check_224px"]["loader_cpu_us_per_view"] - digest["check_224px"]["check_cpu_us_per_view"]
    digest["build_fraction_of_render_cpu"] = {"28px": round(crc["28px_grey"]["crc32"] / render_28, 5),
                                              "224px": round(crc["224px_rgb"]["crc32"] / render_224, 5)}
    runs = [loader_throughput(manifest, spec, int(w), args.batch_size) for w in args.workers.split(",")]
    result = {
        "benchmark": "loader", "quick": args.quick,
        "dataset": {"manifest": manifest.path, "fingerprint": manifest.fingerprint, "samples": manifest.num_samples,
                    "shards": len(manifest.shards)},
        "spec": spec.to_dict(), "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "breakdown": parts, "digest": digest, "dataloader": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))

    us = parts["cpu_us_per_image"]
    print(f"dataset {manifest.path}: {manifest.num_samples} images; load average {load_before[0]:.2f} -> "
          f"{result['machine']['loadavg_after'][0]:.2f} on {os.cpu_count()} cpus")
    print(f"CPU per image (1 process, {parts['images']} images): read {us['read']:.1f} us  decode {us['decode']:.1f} us"
          f"  sample_view {us['sample_view']:.1f} us  apply_view {us['apply_view']:.1f} us  "
          f"  check {us['check']:.1f} us = {us['total']:.1f} us ({parts['images_per_cpu_second']:.0f} images per "
          "CPU-second)")
    d224 = digest["check_224px"]
    print(f"replay check (params + crc32 pixel digest): {digest['check_fraction_28px']:.2%} of loader CPU at 28 px, "
          f"{d224['check_fraction_of_loader_cpu']:.2%} at 224 px ({d224['check_cpu_us_per_view']:.1f} of "
          f"{d224['loader_cpu_us_per_view']:.0f} us); stored digest {digest['bytes_per_view']:.2f} B per view; in the "
          f"build the digest is {digest['build_fraction_of_render_cpu']['28px']:.2%} / "
          f"{digest['build_fraction_of_render_cpu']['224px']:.2%} of the rendering CPU at 28 / 224 px")
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
