"""ImageNet-shaped synthetic run: what the cache costs at ImageNet-1k scale, from measured parts.

1. data: a few thousand synthetic RGB photos at ImageNet-like sizes (long side mostly 500 px, common aspect ratios,
   a 1/f^a colour spectrum like natural images, JPEG quality 90: ~110 KB each, as ImageNet's train set), one class
   folder per label (1000 classes), turned into WebDataset shards + manifest by ``prepare_image_folder``, the path
   ``cit data prepare folder`` takes for the real ImageNet tree;
2. loader: the DeiT recipe at 224 px (``ViewSpec``: RRC, flip, RandAugment m9, random erasing, ImageNet mean/std,
   bicubic) on those shards: per-image CPU time of read / JPEG decode / ``sample_view`` / ``apply_view`` / replay
   check in one process, then DataLoader epochs with 0, 1 and 2 workers; images per CPU-second (process + workers), which other
   jobs on the machine distort far less than wall time (both are recorded, with the load average);
3. bytes per view per teacher at C = 1000, K = 1, 5, 10, 20, written through ``LogitCache.write_unit`` for two
   teachers with trained-like logits (peaked softmax, long tail, confusions among semantically close classes), with
   the real view params of the 224 px spec; ``bench_cache.synthetic_topk`` (random top-k sets) as the hard case;
4. a projection for ImageNet-1k (1,281,167 images, 300 views, a RegNetY-600MF-class conv teacher and a
   RedNet-26-class involution teacher, one GPU): storage, loader core-hours and teacher GPU hours. The GPU
   throughputs are stated assumptions (``--gpu-conv-ips``, ``--gpu-inv-ips``), not measurements.

    python benchmarks/bench_imagenet.py --out benchmarks/results/imagenet.json [--quick] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cache import _chunk_bytes, synthetic_topk        # noqa: E402
from bench_loader import breakdown, cpu_seconds, loader_throughput              # noqa: E402
from shared.augment import ViewSpec, sample_view                          # noqa: E402
from shared.cache_schema import (TEACHER_ARRAYS, CacheAttrs, LogitCache, TeacherRecord, TopK,   # noqa: E402
                                 index_dtype)
from shared.io import atomic_write_text                                   # noqa: E402
from shared.manifest import Manifest                                      # noqa: E402
from shared.models import describe_models                                 # noqa: E402
from shared.prepare import prepare_image_folder                           # noqa: E402

IMAGENET_TRAIN = 1_281_167
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSES = 1000
# DeiT's training recipe at 224 px (bicubic, as timm's DeiT); every other field is ViewSpec's default
SPEC = ViewSpec(image_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
TOPK = (1, 5, 10, 20)
# the paper's CiT-Ti teachers: (cit model name, paper name, published GFLOPs = multiply-adds per 224 px image)
TEACHERS = {"conv": ("regnety_006", "RegNetY-600MF", 0.6), "inv": ("rednet26", "RedNet-26", 1.7)}
# assumed single-GPU inference images/s (A100-class, bf16, large batch) -- NOT measured here, see ASSUMPTIONS
ASSUMED_GPU_IPS = {"conv": 12000.0, "inv": 3000.0}
ASSUMPTIONS = [
    "GPU inference throughputs are assumptions, not measurements: RegNetY-600MF ~12,000 images/s is timm's "
    "published RTX 4090 AMP benchmark for regnety_006 at 224 px, batch 1024 (11,941 images/s; "
    "results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv), taken as roughly what one A100 does in bf16; "
    "RedNet-26 ~3,000 images/s is a guess: no published PyTorch GPU number was found, and the involution runs as "
    "memory-bound elementwise ops (about half of timm's resnet26 at 6,640 images/s on the same 4090 table despite "
    "fewer multiply-adds). Override with --gpu-conv-ips / --gpu-inv-ips.",
    "The teachers run one after the other on the same GPU over every view (the build renders each view once for "
    "both), and the loader keeps up (cores_to_feed_gpu says how many cores that takes).",
    "Loader cost per view = the measured images per CPU-second of the 1-worker DataLoader epoch (worker + main "
    "process: shard read, JPEG decode, sample_view, apply_view, collation), on synthetic JPEGs sized like "
    "ImageNet's; real photos decode at about the same cost per byte and pixel. Stage 2 replays the same number of "
    "views again while training (one view per image per epoch, 300 epochs).",
    "Bytes per view come from synthetic trained-like logits (see bytes_per_view.logits); a real teacher's top-k "
    "sets may compress somewhat better or worse. View params bytes are measured with the 224 px spec's real "
    "records and are shared by all teachers.",
    "Storage counts chunk files only (Zarr metadata is a few KiB, independent of N).",
]


# ---------------------------------------------------------------------------------------------------------------
# 1. data

ASPECTS = np.array([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9])
ASPECT_P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


def photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): long side 500 px for 3 images in 4 (as most of ImageNet), else 256..500; a quarter
    portrait."""
    long = 500 if rng.random() < 0.75 else int(rng.integers(256, 501))
    short = max(int(round(long / rng.choice(ASPECTS, p=ASPECT_P))), 200)
    return (long, short) if rng.random() < 0.75 else (short, long)


def synthetic_photo(rng: np.random.Generator, width: int, height: int, alpha: float) -> np.ndarray:
    """uint8 HxWx3 with a 1/f^alpha amplitude spectrum (natural images: alpha ~ 1) and correlated channels, so
    JPEG spends on it about what it spends on a photo (white noise would be ~5x larger, a flat image ~50x
    smaller)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    freq = np.hypot(fy, fx)
    freq[0, 0] = 1.0
    amplitude = freq ** -alpha
    amplitude[0, 0] = 0.0
    shape = (3, height, width // 2 + 1)
    fields = np.fft.irfft2((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * amplitude,
                           s=(height, width))
    luma, a, b = fields
    rgb = np.stack([luma + 0.5 * a, luma + 0.5 * b, luma - 0.5 * a])
    rgb = 128 + 50 * (rgb - rgb.mean()) / rgb.std()
    return np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def write_image_folder(root: str, n: int, classes: int, seed: int, alpha: float, quality: int) -> dict:
    """``root/<class>/<image>.jpg`` for image i of class i % classes; regenerated only if the settings changed
    (a rerun with the same ``--workdir`` then reuses the shards too: the prepare recipe includes file mtimes)."""
    settings = {"n": n, "classes": classes, "seed": seed, "alpha": alpha, "quality": quality}
    marker = os.path.join(root, ".complete.json")
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done["settings"] == settings:
            return done["stats"]
    shutil.rmtree(root, ignore_errors=True)
    sizes, nbytes = [], []
    for i in tqdm(range(n), desc="images", unit="img", mininterval=2.0):
        rng = np.random.default_rng([seed, i])
        width, height = photo_size(rng)
        folder = os.path.join(root, f"class{i % classes:04d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img{i:07d}.jpg")
        Image.fromarray(synthetic_photo(rng, width, height, alpha)).save(path, format="JPEG", quality=quality)
        sizes.append((width, height))
        nbytes.append(os.path.getsize(path))
    wh = np.array(sizes)
    stats = {"images": n, "classes": min(n, classes), "jpeg_quality": quality, "spectrum_alpha": alpha,
             "bytes_mean": float(np.mean(nbytes)), "bytes_median": float(np.median(nbytes)),
             "bytes_min": int(np.min(nbytes)), "bytes_max": int(np.max(nbytes)),
             "width_mean": float(wh[:, 0].mean()), "height_mean": float(wh[:, 1].mean()),
             "side_min": int(wh.min()), "side_max": int(wh.max()),
             "portrait_fraction": float((wh[:, 1] > wh[:, 0]).mean())}
    atomic_write_text(marker, json.dumps({"settings": settings, "stats": stats}))
    return stats


def make_dataset(workdir: str, n: int, shard_size: int, seed: int, alpha: float, quality: int
                 ) -> tuple[Manifest, dict]:
    images = os.path.join(workdir, "images")
    stats = write_image_folder(images, n, CLASSES, seed, alpha, quality)
    workers = 1 if n < 1000 else None        # a few images: one process (a pool starts slower than it writes them)
    manifest = prepare_image_folder(images, os.path.join(workdir, "data"), "train", shard_size=shard_size,
                                    workers=workers)
    shard_bytes = sum(os.path.getsize(manifest.shard_url(i)) for i in range(len(manifest.shards)))
    return manifest, {**stats, "shard_bytes_per_image": shard_bytes / manifest.num_samples}


# ---------------------------------------------------------------------------------------------------------------
# 2. loader

def dataloader_runs(manifest: Manifest, spec: ViewSpec, workers: list[int], batch_size: int) -> list[dict]:
    runs = []
    for w in workers:
        run = loader_throughput(manifest, spec, w, batch_size)
        runs.append(run)
        print(f"  workers={w}: {run['images']} images, {run['seconds']:.1f} s wall ({run['images_per_s']:.1f} img/s), "
              f"{run['cpu_seconds']:.1f} CPU s ({run['images_per_cpu_second']:.1f} img per CPU-second)", flush=True)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# 3. bytes per view per teacher

class TrainedLikeLogits:
    """Logits of a trained 1000-class classifier, synthetically: cosine similarity between a noisy image feature
    and class prototypes that come in 100 groups of 10 related classes (ImageNet's dog breeds, say), times a
    scale.  Each teacher perturbs the shared prototypes.  Tuned to ~75% top-1 agreement with the label, a mean top
    probability ~0.65 and ~90% of the mass in the top 10: peaked, with a long tail, confusions among related
    classes -- not uniform noise and not random top-k sets."""

    DIM, GROUPS, SCALE, NOISE, TEACHER_SHIFT = 64, 100, 32.0, 1.9, 0.3

    def __init__(self, classes: int, seed: int):
        rng = np.random.default_rng([seed, 0xC1A55])
        centres = rng.standard_normal((self.GROUPS, self.DIM))
        self.classes = classes
        group = np.arange(classes) * self.GROUPS // classes
        self.prototypes = centres[group] + rng.standard_normal((classes, self.DIM))
        self.seed = seed

    def logits(self, teacher: int, view: int, labels: np.ndarray) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, teacher, 0x7EAC])
        w = self.prototypes + self.TEACHER_SHIFT * rng.standard_normal(self.prototypes.shape)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        rng = np.random.default_rng([self.seed, teacher, view])
        feature = w[labels] + self.NOISE * rng.standard_normal((len(labels), self.DIM)) / np.sqrt(self.DIM)
        feature /= np.linalg.norm(feature, axis=1, keepdims=True)
        return torch.from_numpy((self.SCALE * feature @ w.T).astype(np.float32))


def to_topk(logits: torch.Tensor, k: int) -> TopK:
    from shared.targets import encode_logits
    return TopK.from_float(*encode_logits(logits, k, (1.0,)), logits.shape[1])


def logit_stats(logits: torch.Tensor, labels: np.ndarray) -> dict:
    p = logits.softmax(1)
    top = p.topk(20, 1).values
    return {"top1_agrees_with_label": float((logits.argmax(1).numpy() == labels).mean()),
            "mean_top1_prob": float(top[:, 0].mean()),
            **{f"mean_top{k}_mass": float(top[:, :k].sum(1).mean()) for k in (5, 10, 20)},
            "mean_entropy_nats": float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()),
            "mean_top1_logit": float(logits.max(1).values.mean()), "mean_logit_std": float(logits.std(1).mean())}


def write_cache(out: str, rows: int, views: int, k: int, chunk_rows: int, params: np.ndarray,
                outputs: dict[str, list[torch.Tensor]] | None, rng: np.random.Generator | None = None) -> None:
    """A cache of two teachers through ``LogitCache.write_unit``: top-k of the given logits per view, or (outputs
    None) ``bench_cache.synthetic_topk``'s random top-k sets."""
    records = [TeacherRecord(name, name, arch, "", CLASSES, list(SPEC.mean), list(SPEC.std))
               for name, (arch, _, _) in TEACHERS.items()]
    attrs = CacheAttrs("synthetic", rows, CLASSES, views, k, 0, SPEC.to_dict(), chunk_rows, records)
    cache = LogitCache.create(out, attrs, SPEC.num_params)
    for v in range(views):
        for c in range(attrs.num_chunks):
            lo, hi = attrs.chunk_rows_range(c)
            units = {name: to_topk(outputs[name][v][lo:hi], k) if outputs else synthetic_topk(CLASSES, k, hi - lo, rng)
                     for name in TEACHERS}
            digests = np.random.default_rng([v, c]).integers(0, 2 ** 32, hi - lo, dtype=np.uint32)  # crc32-like
            cache.write_unit(v, c, params[v, lo:hi], units, digests=digests)


def teacher_bytes(out: str, views: int, rows: int) -> dict[str, dict[str, float]]:
    return {name: {a: _chunk_bytes(os.path.join(out, name, a)) / (views * rows) for a in TEACHER_ARRAYS}
            for name in TEACHERS}


def bench_bytes(tmp: str, rows: int, views: int, chunk_rows: int, seed: int) -> dict:
    keys = [f"img{i:07d}" for i in range(rows)]
    params = np.stack([np.stack([sample_view(SPEC, seed, key, v).encode(SPEC) for key in keys])
                       for v in range(views)])
    labels = np.random.default_rng([seed, 0x1AB]).integers(0, CLASSES, rows)
    model = TrainedLikeLogits(CLASSES, seed)
    logits = {name: [model.logits(t, v, labels) for v in range(views)] for t, name in enumerate(TEACHERS)}
    result = {}
    params_bytes = None
    for k in TOPK:
        out = os.path.join(tmp, f"k{k}.zarr")
        write_cache(out, rows, views, k, chunk_rows, params, logits)
        real = teacher_bytes(out, views, rows)
        params_bytes = _chunk_bytes(os.path.join(out, "params")) / (views * rows)
        shutil.rmtree(out)
        write_cache(out, rows, views, k, chunk_rows, params, None, np.random.default_rng([seed, k]))
        hard = teacher_bytes(out, views, rows)
        shutil.rmtree(out)
        per_teacher = {name: sum(b.values()) for name, b in real.items()}
        result[str(k)] = {
            "bytes_per_view_per_teacher": float(np.mean(list(per_teacher.values()))),
            "by_teacher": per_teacher, "by_array": real,
            "raw_record_bytes": k * (2 + index_dtype(CLASSES).itemsize) + 2,
            "random_topk_sets_bytes_per_view_per_teacher": float(np.mean([sum(b.values()) for b in hard.values()]))}
        print(f"  K={k:2d}: {result[str(k)]['bytes_per_view_per_teacher']:6.2f} B/view/teacher "
              f"(random top-k sets {result[str(k)]['random_topk_sets_bytes_per_view_per_teacher']:6.2f}, "
              f"raw record {result[str(k)]['raw_record_bytes']} B)", flush=True)
    return {"classes": CLASSES, "rows": rows, "views": views, "chunk_rows": chunk_rows, "by_k": result,
            "params_bytes_per_view": params_bytes, "params_per_view": SPEC.num_params,
            "logits": {"model": "TrainedLikeLogits: scale x cosine(noisy image feature, class prototypes in 100 "
                                "groups of 10 related classes), per-teacher perturbed prototypes",
                       **{name: logit_stats(logits[name][0], labels) for name in TEACHERS}},
            "note": "bytes = a teacher's chunk files (values fp16 + indices int16 + lse fp32, Blosc/zstd, as "
                    "shared.cache_schema writes them) / (views x rows); params are per view, shared by all "
                    "teachers. random_topk_sets = bench_cache.synthetic_topk (true class uniform, others "
                    "N(0, 1.5^2)): the hard case for compressing indices."}


# ---------------------------------------------------------------------------------------------------------------
# 4. projection

def project(bytes_result: dict, images_per_cpu_second: float, flops: dict, gpu_ips: dict[str, float],
            images: int = IMAGENET_TRAIN, views: int = 300) -> dict:
    total_views = images * views
    teachers = len(TEACHERS)
    params = bytes_result["params_bytes_per_view"]
    storage = {}
    for k, r in bytes_result["by_k"].items():
        logits = r["bytes_per_view_per_teacher"] * total_views * teachers
        storage[k] = {"bytes_per_view_per_teacher": r["bytes_per_view_per_teacher"], "logit_bytes": logits,
                      "params_bytes": params * total_views, "total_bytes": logits + params * total_views,
                      "total_GB": (logits + params * total_views) / 1e9}
    gpu_seconds = {name: total_views / gpu_ips[name] for name in TEACHERS}
    gpu_views_per_s = total_views / sum(gpu_seconds.values())
    loader_core_seconds = total_views / images_per_cpu_second
    return {
        "images": images, "views": views, "total_views": total_views, "teachers": teachers,
        "teacher_models": {name: {"arch": arch, "paper_name": paper, "published_gmacs": gmacs, **flops[name]}
                           for name, (arch, paper, gmacs) in TEACHERS.items()},
        "params_bytes_per_view": params, "storage_by_k": storage,
        "loader_images_per_cpu_second_per_core": images_per_cpu_second,
        "loader_core_hours_per_pass": loader_core_seconds / 3600,
        "loader_core_hours_build_plus_training": 2 * loader_core_seconds / 3600,
        "assumed_gpu_images_per_s": gpu_ips,
        "teacher_gpu_hours": {name: s / 3600 for name, s in gpu_seconds.items()},
        "teacher_gpu_hours_total": sum(gpu_seconds.values()) / 3600,
        "teacher_pflops_total": total_views * sum(f["flops_per_image"] for f in flops.values()) / 1e15,
        "gpu_views_per_s_both_teachers": gpu_views_per_s,
        "cores_to_feed_gpu": gpu_views_per_s / images_per_cpu_second,
        "assumptions": ASSUMPTIONS,
    }


def projection_text(p: dict) -> str:
    gb = lambda x: f"{x / 1e9:,.1f} GB"   # noqa: E731
    lines = [f"Projection, ImageNet-1k: {p['images']:,} images x {p['views']} views = {p['total_views']:,} views, "
             f"{p['teachers']} teachers, one GPU"]
    for name, t in p["teacher_models"].items():
        lines.append(f"  {name}: {t['paper_name']} ({t['arch']}): {t['params'] / 1e6:.2f} M params, "
                     f"{t['flops_per_image'] / 1e9:.2f} GFLOPs/image measured by shared.models.flops (2 per "
                     f"multiply-add; published {t['published_gmacs']} GMACs)")
    lines.append(f"  storage = bytes/view/teacher x {p['total_views']:,} x {p['teachers']} + view params "
                 f"{p['params_bytes_per_view']:.1f} B/view x {p['total_views']:,} "
                 f"(= {gb(p['params_bytes_per_view'] * p['total_views'])}):")
    for k, s in p["storage_by_k"].items():
        lines.append(f"    K={k:>2}: {s['bytes_per_view_per_teacher']:6.2f} B/view/teacher -> logits "
                     f"{gb(s['logit_bytes']):>10} + params -> total {gb(s['total_bytes'])}")
    lines.append(f"  loader: {p['total_views']:,} views / {p['loader_images_per_cpu_second_per_core']:.1f} images per "
                 f"CPU-second = {p['loader_core_hours_per_pass']:,.0f} core-hours per pass over all views "
                 f"(stage 1 build; stage 2 training replays as many again: "
                 f"{p['loader_core_hours_build_plus_training']:,.0f} core-hours for both)")
    gpu = p["assumed_gpu_images_per_s"]
    hours = ", ".join(f"{name} {h:,.1f} GPU-h" for name, h in p["teacher_gpu_hours"].items())
    lines.append(f"  teachers (ASSUMED GPU throughput, not measured: conv {gpu['conv']:,.0f} img/s, inv "
                 f"{gpu['inv']:,.0f} img/s): {hours} = {p['teacher_gpu_hours_total']:,.1f} GPU-hours "
                 f"({p['teacher_pflops_total']:,.0f} PFLOPs)")
    lines.append(f"  feeding the GPU at {p['gpu_views_per_s_both_teachers']:,.0f} views/s (both teachers per view) "
                 f"takes {p['cores_to_feed_gpu']:.1f} loader cores")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/imagenet.json")
    parser.add_argument("--quick", action="store_true", help="24 images, small cache arrays (seconds)")
    parser.add_argument("--workdir", default=None,
                        help="where images, shards and caches go (kept, and reused by a rerun with the same "
                             "settings); default: a temporary folder, removed at the end")
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 3000, quick 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gpu-conv-ips", type=float, default=ASSUMED_GPU_IPS["conv"],
                        help="ASSUMED conv teacher inference images/s on one GPU (projection only)")
    parser.add_argument("--gpu-inv-ips", type=float, default=ASSUMED_GPU_IPS["inv"],
                        help="ASSUMED involution teacher inference images/s on one GPU (projection only)")
    args = parser.parse_args(argv)

    started, cpu_started, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()
    torch.set_num_threads(1)
    n = args.images or (24 if args.quick else 3000)
    shard_size = 12 if args.quick else 1000
    rows, views, chunk_rows = (256, 1, 256) if args.quick else (8192, 2, 4096)
    workers = [int(w) for w in args.workers.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="cit-bench-imagenet-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"data: {n} synthetic JPEG images in {workdir}", flush=True)
        manifest, data = make_dataset(workdir, n, shard_size, args.seed, alpha=1.05, quality=90)
        print(f"  {manifest.num_samples} images in {len(manifest.shards)} shards, {manifest.num_classes} classes; "
              f"JPEG {data['bytes_mean'] / 1e3:.1f} KB mean, {data['width_mean']:.0f} x {data['height_mean']:.0f} px "
              f"mean", flush=True)
        print("loader: per-image breakdown", flush=True)
        parts = breakdown(manifest, SPEC)
        print("  CPU us/image: " + "  ".join(f"{k} {v:.0f}" for k, v in parts["cpu_us_per_image"].items())
              + f"  -> {parts['images_per_cpu_second']:.1f} images per CPU-second", flush=True)
        runs = dataloader_runs(manifest, SPEC, workers, args.batch_size)
        basis = next((r for r in runs if r["workers"] == 1), runs[-1])
        print("bytes per view per teacher, C=1000", flush=True)
        size = bench_bytes(os.path.join(workdir, "caches"), rows, views, chunk_rows, args.seed)
        flops = {name: {"params": d["params"], "flops_per_image": d["flops"]}
                 for name, d in zip(TEACHERS, describe_models([a for a, _, _ in TEACHERS.values()]))}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    projection = project(size, basis["images_per_cpu_second"], flops,
                         {"conv": args.gpu_conv_ips, "inv": args.gpu_inv_ips})
    result = {
        "benchmark": "imagenet", "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"command": shlex.join(sys.argv if argv is None else ["benchmarks/bench_imagenet.py", *argv]),
                     "images": n, "classes": CLASSES, "seed": args.seed, "shard_size": shard_size,
                     "batch_size": args.batch_size, "workers": workers,
                     "cache_rows": rows, "cache_views": views, "chunk_rows": chunk_rows, "topk": list(TOPK),
                     "workdir": args.workdir, "spec": SPEC.to_dict()},
        "dataset": {"fingerprint": manifest.fingerprint, "samples": manifest.num_samples,
                    "shards": len(manifest.shards), "manifest_classes": manifest.num_classes, **data},
        "loader": {"breakdown": parts, "dataloader": runs,
                   "images_per_cpu_second_per_core": basis["images_per_cpu_second"],
                   "basis": f"DataLoader epoch with {basis['workers']} worker(s): images / CPU-seconds of the "
                            "worker(s) and the main process (one intra-op thread each)"},
        "bytes_per_view": {k: r["bytes_per_view_per_teacher"] for k, r in size["by_k"].items()},
        "bytes": size,
        "projection": projection,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(cpu_seconds() - cpu_started, 1),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(projection_text(projection))
    print(f"load average {load_start[0]:.2f} -> {result['machine']['loadavg_end'][0]:.2f} on {os.cpu_count()} cpus; "
          f"{result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} CPU s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
