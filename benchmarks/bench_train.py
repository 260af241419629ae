"""Student training throughput with cached, online and no KD, side by side; trainer and builder peak memory vs N.

Throughput: the real trainer's pieces (``trainer.train.prepare``: shard stream, replay, cache join, Eq. 1 loss;
AdamW) over the same shards and views for each mode, at cit_nano and cit_tiny size.  Modes are interleaved step by
step and the median step time is reported (see ``throughput``), so load from other jobs on the machine hits them
alike — epoch-level timing on this shared 2-core machine swung ±20% between modes.  The no-KD baseline uses the same three-head
student (``student.heads = [cls, conv, inv]``): the ratio isolates the cost of distillation, not of the tokens.
The cache is built by ``cit cache build``'s library function from the two default teachers (random weights:
throughput does not depend on them).

Memory: a fresh process trains one cached-KD epoch on datasets of growing size (cache written directly with
random logits and the real view params); its peak RSS and its DataLoader workers' peak RSS are recorded.  The
trainer streams, so both should stay flat as the dataset grows.  Likewise a fresh process builds a one-view cache
of the two default teachers over each dataset (``build_memory``): the builder streams too.
``--memory-only`` reruns just the two memory curves into an existing JSON.

    python benchmarks/bench_train.py [--quick] [--out benchmarks/results/train.json]

``--quick`` (a smoke run, numbers not meaningful): cit_nano only, 64 samples, one timed epoch per mode, one small
dataset size per memory curve, run in this process (the code path; a fresh process per point makes the numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shared.augment import ViewSpec                            # noqa: E402
from shared.io import atomic_write_text                        # noqa: E402

CONV_TEACHER = ("regnety_002", {"small_input": True})   # default conv teacher: timm name + small-input stem
INV_TEACHER = ("rednet_small", {})                       # default involution teacher
SPEC = ViewSpec(image_size=28)


def throughput_world(folder: str, samples: int, views: int, workers: int | None = None) -> tuple[str, dict, str]:
    """(manifest, teacher checkpoints, cache) in ``folder``: the data, teachers and cache a throughput run trains on."""
    from cache_builder.build import build_cache
    manifest = make_data(os.path.join(folder, "data"), samples)
    checkpoints = make_teachers(folder)
    cache = os.path.join(folder, "cache.zarr")
    build_cache(manifest, checkpoints, cache, views=views, topk=10, spec=SPEC, seed=0, progress=False,
                workers=workers)
    return manifest, checkpoints, cache


def machine_info() -> dict:
    """Where a throughput run ran (its load at the start: the ratios are paired, the absolute rates are not)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_start": os.getloadavg()}


def make_data(folder: str, num_samples: int, shard_size: int = 512, seed: int = 0) -> str:
    """Random 28x28 grey images in shards (content does not matter for throughput or memory)."""
    from shared.manifest import Manifest, ShardInfo, file_sha256
    from shared.shards import ShardWriter, encode_png
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ShardWriter(os.path.join(folder, "s-%04d.tar"), shard_size) as writer:
        for i in range(num_samples):
            writer.write({"__key__": f"s{i:07d}", "png": encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
                          "cls": str(i % 10)})
    shards = [ShardInfo(os.path.basename(w.path), w.samples, file_sha256(w.path)) for w in writer.written]
    manifest = Manifest(shards, 10, [f"c{c}" for c in range(10)], name="bench", channels=1)
    path = os.path.join(folder, "train.json")
    manifest.save(path)
    return path


def make_teachers(folder: str) -> dict[str, str]:
    from shared import checkpoint, models
    paths = {}
    for name, kind, (arch, options) in (("conv", "conv", CONV_TEACHER), ("inv", "inv", INV_TEACHER)):
        torch.manual_seed(0)
        model = models.create_model(arch, num_classes=10, in_chans=1, **options)
        path = os.path.join(folder, f"{name}.safetensors")
        checkpoint.save_checkpoint(model, path, {"arch": arch, "kind": kind, "num_classes": 10, "in_chans": 1,
                                                 "mean": list(SPEC.mean), "std": list(SPEC.std),
                                                 "model_kwargs": options})
        paths[name] = path
    return paths


def run_config(manifest: str, cache: str, arch: str, mode: str, batch_size: int, workers: int, epochs: int,
               checkpoints: dict[str, str], extra: tuple[str, ...] = ()):
    from trainer.train import load_run_config
    sets = [f"data.train={json.dumps(manifest)}", f"data.cache={json.dumps(cache)}", f"student.arch={arch}",
            'student.heads=["cls", "conv", "inv"]', f"kd.mode={mode}", 'kd.conv_teacher="conv"',
            'kd.inv_teacher="inv"', f"train.batch_size={batch_size}", f"data.num_workers={workers}",
            f"train.epochs={epochs}", "train.progress=false", "data.allow_repeat_views=true",
            *(f"kd.checkpoints.{k}={json.dumps(v)}" for k, v in checkpoints.items()), *extra]
    return load_run_config(None, sets)


def throughput(manifest: str, cache: str, checkpoints: dict, arch: str, rounds: int, batch_size: int,
               modes: tuple[str, ...]) -> dict:
    """Samples/s per mode from the median *step* time, modes interleaved step by step (``paired_steps``)."""
    import warnings

    from trainer.train import prepare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = {m: prepare(run_config(manifest, cache, arch, m, batch_size, 0, rounds, checkpoints)) for m in modes}
    return paired_steps(prepared, rounds, batch_size)


def paired_steps(prepared: dict, rounds: int, batch_size: int, warmup: int = 2) -> dict:
    """Samples/s per mode from the median *step* time, modes interleaved step by step.

    One process, data prepared inline (``num_workers = 0``), so a step's time is: fetch + replay + cache join +
    forward + Eq. 1 + backward + AdamW.  This is the worst case for cached KD (its join is not hidden in a worker)
    and it is robust to load from other jobs: every mode's step k runs within the same second, in rotating order.
    """
    from trainer.data import make_loader
    from trainer.engine import make_optimizer
    modes = tuple(prepared)
    state = {}
    for mode, p in prepared.items():
        p.student.to(p.runtime.device).train()
        state[mode] = (p, make_optimizer(p.student, p.cfg.train, p.runtime.device),
                       make_loader(p.train_set, batch_size, 0, pin_memory=p.runtime.device.type == "cuda"))
    times: dict[str, list[float]] = {m: [] for m in modes}
    paired: dict[tuple[int, int], dict[str, float]] = {}        # (epoch, step) -> mode -> seconds
    for epoch in range(rounds):
        iters = {}
        for mode, (p, _, loader) in state.items():
            p.train_set.set_epoch(epoch)
            iters[mode] = iter(loader)
        step = 0
        while True:
            order = modes[step % len(modes):] + modes[:step % len(modes)]
            done = False
            for mode in order:
                p, opt, _ = state[mode]
                started = time.perf_counter()
                batch = next(iters[mode], None)
                if batch is None:
                    done = True
                    break
                batch = batch.to(p.runtime.device)
                loss, _ = p.loss_fn(p.student, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if p.runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                if (epoch > 0 or step >= warmup) and len(batch) == batch_size:   # skip warm-up and partial batches
                    times[mode].append(time.perf_counter() - started)
                    paired.setdefault((epoch, step), {})[mode] = times[mode][-1]
            if done:
                break
            step += 1
    out = {m: {"samples_per_s": batch_size / statistics.median(times[m]), "steps_timed": len(times[m]),
               "step_ms_median": 1e3 * statistics.median(times[m]),
               "step_ms_iqr": [1e3 * q for q in statistics.quantiles(times[m], n=4)[::2]] if len(times[m]) > 1
               else [1e3 * times[m][0]] * 2} for m in modes}
    for other in ("none", "online"):
        if "cached" in out and other in out:
            out[f"cached_over_{other}"] = out["cached"]["samples_per_s"] / out[other]["samples_per_s"]
            # the same ratio from step pairs run back to back: robust to load that drifts during the run
            pairs = [t[other] / t["cached"] for t in paired.values() if other in t and "cached" in t]
            out[f"cached_over_{other}_paired_median"] = statistics.median(pairs) if pairs else None
    if "none" in out and "online" in out:
        pairs = [t["online"] / t["none"] for t in paired.values() if "online" in t and "none" in t]
        out["none_over_online_paired_median"] = statistics.median(pairs) if pairs else None
    out["params"] = sum(q.numel() for q in prepared[modes[0]].student.parameters())
    return out


def loader_ratio(manifest: str, spec: ViewSpec, cache: str, teachers: tuple[str, ...], batch_size: int,
                 passes: int) -> dict:
    """Images per CPU-second of the training loader (read, decode, replay, batch; + the cache join and its
    params/digest check for ``cached``), one process.  In each pass both loaders advance batch by batch in turn
    (the order alternating), each batch's CPU time charged to its loader, so load that drifts during a pass hits
    both alike; the ratio is the median of the per-pass ratios."""
    from shared.manifest import Manifest
    from trainer.data import TrainViews, make_loader
    man = Manifest.load(manifest)
    sets = {"none": TrainViews(man, spec, 0, 1, rank=0, world=1),
            "cached": TrainViews(man, spec, 0, 1, cache_url=cache, teachers=teachers, rank=0, world=1)}
    loaders = {m: make_loader(ds, batch_size, 0, pin_memory=False) for m, ds in sets.items()}
    rate: dict[str, list[float]] = {m: [] for m in loaders}
    wall: dict[str, list[float]] = {m: [] for m in loaders}
    for r in range(passes + 1):                    # pass 0 warms caches (files, allocator) and is not counted
        streams = {m: iter(loader) for m, loader in loaders.items()}
        cpu, clock, images = dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, 0)
        step = 0
        while streams:
            for m in (("none", "cached") if step % 2 else ("cached", "none")):
                if m not in streams:
                    continue
                c, w = time.process_time(), time.perf_counter()
                batch = next(streams[m], None)
                cpu[m] += time.process_time() - c
                clock[m] += time.perf_counter() - w
                if batch is None:
                    del streams[m]
                else:
                    images[m] += len(batch)
            step += 1
        if r:
            for m in loaders:
                rate[m].append(images[m] / cpu[m])
                wall[m].append(images[m] / clock[m])
    pairs = [c / n for c, n in zip(rate["cached"], rate["none"])]
    return {"images_per_cpu_s": {m: statistics.median(v) for m, v in rate.items()},
            "images_per_wall_s": {m: statistics.median(v) for m, v in wall.items()},
            "cached_over_none": statistics.median(pairs), "pairs": pairs, "images": man.num_samples,
            "image_size": spec.image_size, "batch_size": batch_size}


def step_ratio(ps: dict, batch, reps: int, warmup: int = 2) -> dict:
    """Median step time (forward + Eq. 1 + backward + AdamW) on one fixed device batch, no-KD vs cached KD,
    interleaved after ``warmup`` untimed pairs; the ratio is the median of back-to-back pairs."""
    from trainer.engine import make_optimizer
    opts = {m: make_optimizer(q.student, q.cfg.train, q.runtime.device) for m, q in ps.items()}
    step = {m: [] for m in ps}
    for r in range(reps + warmup):
        for m in (("none", "cached") if r % 2 else ("cached", "none")):
            q = ps[m]
            q.student.train()
            started = time.perf_counter()
            loss, _ = q.loss_fn(q.student, batch)
            opts[m].zero_grad(set_to_none=True)
            loss.backward()
            opts[m].step()
            if q.runtime.device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                step[m].append(time.perf_counter() - started)
    pairs = [n / c for n, c in zip(step["none"], step["cached"])]
    return {"step_ms": {m: 1e3 * statistics.median(v) for m, v in step.items()},
            "step_cached_over_none": statistics.median(pairs), "pairs": len(pairs),
            "pair_quartiles": statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs}


def adamw_step_ms(model: torch.nn.Module, weight_decay: float, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of one AdamW step over ``model``'s parameter groups (with its last gradients) in torch's three
    implementations: the per-tensor loop (torch's default on the CPU), foreach, and fused (``make_optimizer``'s)."""
    from trainer.engine import param_groups
    out = {}
    for name, kind in (("for_loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=1e-4, **kind)
        times = []
        for _ in range(reps + warmup):
            started = time.perf_counter()
            opt.step()
            if next(model.parameters()).is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        out[name] = 1e3 * statistics.median(times[warmup:])
    return out


# -----------------------------------------------------------------------------------------------------------------
# Memory: one process per dataset size

def write_random_cache(url: str, manifest_path: str, views: int, seed: int = 0, spec: ViewSpec = SPEC,
                       num_classes: int = 10, topk: int = 10, teachers: tuple[str, ...] = ("conv", "inv"),
                       chunk_rows: int = 1024) -> None:
    """A complete cache with random top-k but the real view params and pixel digests (so the trainer's replay
    check passes).  ``cit cache build`` makes chunks as long as the shards; pass the shard size to match it."""
    from shared.cache_schema import STATUS_COMPLETE, CacheAttrs, LogitCache, TeacherRecord, TopK, create_arrays, \
        open_root
    from shared.manifest import Manifest
    from shared.reader import pieces_for_rows, read_piece
    from shared.targets import encode_logits
    from shared.views import VIEW_CODE, pixel_digest, render_view
    manifest = Manifest.load(manifest_path)
    records = [TeacherRecord(n, n, "random", "", num_classes, list(spec.mean), list(spec.std)) for n in teachers]
    attrs = CacheAttrs(manifest.fingerprint, manifest.num_samples, num_classes, views, topk, seed, spec.to_dict(),
                       chunk_rows, records, view_code=dict(VIEW_CODE))
    root = open_root(url, "w")
    create_arrays(root, attrs, spec.num_params)
    root.attrs.update(attrs.to_json_dict())
    cache = LogitCache(root, attrs)
    rng = np.random.default_rng(0)
    for chunk in range(attrs.num_chunks):
        lo, hi = attrs.chunk_rows_range(chunk)
        raws = [s for p in pieces_for_rows(manifest, lo, hi) for s in read_piece(manifest, p)]
        for v in range(views):
            rendered = [render_view(spec, seed, v, raw) for raw in raws]
            params = np.stack([r[1] for r in rendered])
            digests = np.asarray([pixel_digest(r[0]) for r in rendered], dtype=np.uint32)
            outputs = {}
            for name in teachers:
                logits = torch.from_numpy(rng.normal(size=(hi - lo, num_classes)).astype(np.float32) * 3)
                outputs[name] = TopK.from_float(*encode_logits(logits, topk, attrs.temperatures), num_classes)
            cache.write_unit(v, chunk, params, outputs, digests=digests)
    root.attrs["status"] = STATUS_COMPLETE


# -----------------------------------------------------------------------------------------------------------------
# 224 px: synthetic JPEG shards, the DeiT recipe, ImageNet's 1000 classes

SPEC224 = ViewSpec(image_size=224, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PAPER_CONV = "regnety_040"        # RegNetY-4GF (timm)
PAPER_INV = ("rednet26", "rednet101")


def make_jpeg_data(folder: str, num_samples: int, shard_size: int = 64, classes: int = 1000, seed: int = 0) -> str:
    """Synthetic photos (ImageNet-like sizes, 1/f spectrum, JPEG q90: see bench_imagenet) in shards, C = 1000."""
    import io

    from PIL import Image

    from benchmarks.bench_imagenet import photo_size, synthetic_photo
    from shared.manifest import Manifest, ShardInfo, file_sha256
    from shared.shards import ShardWriter
    os.makedirs(folder, exist_ok=True)
    with ShardWriter(os.path.join(folder, "j-%04d.tar"), shard_size) as writer:
        for i in range(num_samples):
            rng = np.random.default_rng([seed, i])
            buffer = io.BytesIO()
            Image.fromarray(synthetic_photo(rng, *photo_size(rng), 1.0)).save(buffer, format="JPEG", quality=90)
            writer.write({"__key__": f"j{i:07d}", "jpg": buffer.getvalue(), "cls": str(i % classes)})
    shards = [ShardInfo(os.path.basename(w.path), w.samples, file_sha256(w.path)) for w in writer.written]
    manifest = Manifest(shards, classes, [f"c{c}" for c in range(classes)], name="jpeg224", channels=3)
    path = os.path.join(folder, "train.json")
    manifest.save(path)
    return path


def spec_sets(spec: ViewSpec) -> list[str]:
    return [f"augment.{k}={json.dumps(v)}" for k, v in spec.to_dict().items()]


def paper_teachers(folder: str, inv: str) -> dict[str, str]:
    """RegNetY-4GF + RedNet-``inv`` checkpoints at 224 px, C = 1000, RGB (random weights: speed does not depend
    on them)."""
    from shared import checkpoint, models
    paths = {}
    for name, kind, arch in (("conv", "conv", PAPER_CONV), ("inv", "inv", inv)):
        torch.manual_seed(0)
        model = models.create_model(arch, num_classes=1000, in_chans=3)
        path = os.path.join(folder, f"{name}-{arch}.safetensors")
        checkpoint.save_checkpoint(model, path, {"arch": arch, "kind": kind, "num_classes": 1000, "in_chans": 3,
                                                 "mean": list(SPEC224.mean), "std": list(SPEC224.std)})
        paths[name] = path
    return paths


def flops_projection(arch: str, checkpoints: dict[str, str]) -> dict:
    """Per-image FLOPs (``shared.models.flops``): a student training step ≈ 3× its forward (forward + backward);
    online KD adds the teachers' forwards; cached KD adds none.  The projected step ratios follow."""
    from shared import models
    from shared.checkpoint import load_checkpoint
    from shared.models.flops import count_flops
    student = models.create_model(arch, num_classes=1000, in_chans=3)
    s = count_flops(student, (3, 224, 224))
    teachers = {name: count_flops(load_checkpoint(path)[0], (3, 224, 224)) for name, path in checkpoints.items()}
    online = 3 * s + sum(teachers.values())
    return {"student_forward_gflops": s / 1e9, "teacher_forward_gflops": {k: v / 1e9 for k, v in teachers.items()},
            "step_gflops": {"none": 3 * s / 1e9, "cached": 3 * s / 1e9, "online": online / 1e9},
            "projected_none_over_online": online / (3 * s), "projected_cached_over_online": online / (3 * s)}


def paper224(folder: str, quick: bool, inv_teachers: tuple[str, ...]) -> dict:
    """The paper's setting at 224 px: CiT-Ti-sized student (``cit_tiny``), RegNetY-4GF + RedNet teachers, 1000
    classes, per-step paired student-only / cached KD / online KD (``paired_steps``), FLOPs projection beside."""
    import warnings

    from trainer.train import prepare
    n, batch = (6, 2) if quick else (40, 8)
    manifest = make_jpeg_data(os.path.join(folder, "jpeg224"), n, shard_size=n)
    cache = os.path.join(folder, "cache224.zarr")
    write_random_cache(cache, manifest, views=1, spec=SPEC224, num_classes=1000, chunk_rows=n)
    out = {"samples": n, "batch_size": batch, "student": "cit_tiny", "conv_teacher": PAPER_CONV, "runs": {}}
    for inv in inv_teachers:
        checkpoints = paper_teachers(folder, inv)
        sets = (*spec_sets(SPEC224), "data.verify_shards=false")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = {m: prepare(run_config(manifest, cache if m == "cached" else "", "cit_tiny", m, batch, 0, 1,
                                              checkpoints, sets)) for m in ("none", "cached", "online")}
        print(f"  paper224 with {inv}: {n // batch} paired steps per mode ...", flush=True)
        r = paired_steps(prepared, 1, batch, warmup=1)
        r["flops"] = flops_projection("cit_tiny", checkpoints)
        r["goal"] = {"cached_over_online": r["cached_over_online_paired_median"],
                     "0.95_x_none_over_online": 0.95 * r["none_over_online_paired_median"]}
        r["goal"]["met"] = r["goal"]["cached_over_online"] >= r["goal"]["0.95_x_none_over_online"]
        out["runs"][f"{PAPER_CONV}+{inv}"] = r
        print(f"  {inv}: none {r['none']['step_ms_median']:.0f} ms, cached {r['cached']['step_ms_median']:.0f} ms, "
              f"online {r['online']['step_ms_median']:.0f} ms; cached/online {r['cached_over_online_paired_median']:.2f}"
              f" vs student-only/online {r['none_over_online_paired_median']:.2f} (FLOPs projection "
              f"{r['flops']['projected_cached_over_online']:.2f})", flush=True)
        del prepared
    return out


def piece_read_ms(cache: str, teachers: tuple[str, ...], rows: int, reps: int) -> float:
    """CPU ms of the join's one concurrent read of a ``rows``-row piece's block (params, digests, each teacher's
    top-k).  Mostly a fixed cost per piece and array (Zarr's per-call work, not the bytes), so its share of the
    loader is about this ÷ (rows × the loader's per-image cost)."""
    from shared.cache_schema import LogitCache
    from shared.reader import Piece
    from trainer.data import read_block
    handle = LogitCache.open(cache)
    n = handle.attrs.num_samples
    pieces = [Piece(lo // rows, lo, min(lo + rows, n)) for lo in range(0, n, rows)]
    read_block(handle, 0, pieces[0], list(teachers), verify=True)
    started = time.process_time()
    for _ in range(reps):
        for piece in pieces:
            read_block(handle, 0, piece, list(teachers), verify=True)
    return 1e3 * (time.process_time() - started) / (reps * len(pieces))


# The shards users have: `cit data prepare` writes 5,000 samples per shard (28 px), ImageNet's WebDataset shards hold
# ~1,250 (1,281,167 images in 1,024 shards).  The join reads one block per piece (= shard part), so its share of the
# loader falls with the shard size: ``piece_read_ms`` gives that fixed cost for other sizes.
JOIN_SHARDS = {28: 5000, 224: 1251}


def join_part(folder: str, quick: bool) -> dict:
    """Loader cached ÷ none (images per CPU-second) at 28 px and 224 px on two shards of the usual size each, the
    join's fixed CPU cost per piece, and step cached ÷ none at cit_nano and cit_tiny (28 px) and the paper's
    cit_tiny at 224 px (C = 1000), all paired."""
    import warnings

    from trainer.data import make_loader
    from trainer.train import prepare
    shard28, shard224 = (64, 4) if quick else (JOIN_SHARDS[28], JOIN_SHARDS[224])
    # passes per size: a 28 px pass is a few seconds, and one pass's rate moves by a few percent, so it gets more
    batch, passes = (16, {28: 2, 224: 2}) if quick else (32, {28: 12, 224: 4})
    m28 = make_data(os.path.join(folder, "data28"), 2 * shard28, shard_size=shard28)
    c28 = os.path.join(folder, "cache28.zarr")
    write_random_cache(c28, m28, views=1, chunk_rows=shard28)
    m224 = make_jpeg_data(os.path.join(folder, "jpeg224"), 2 * shard224, shard_size=shard224)
    c224 = os.path.join(folder, "cache224.zarr")
    write_random_cache(c224, m224, views=1, spec=SPEC224, num_classes=1000, chunk_rows=shard224)
    out = {"loader": {}, "step": {}}
    for size, manifest, cache, spec, shard in ((28, m28, c28, SPEC, shard28), (224, m224, c224, SPEC224, shard224)):
        row = loader_ratio(manifest, spec, cache, ("conv", "inv"), batch, passes[size])
        row["shard_size"] = shard
        row["piece_read_ms"] = piece_read_ms(cache, ("conv", "inv"), shard, reps=2 if quick else 20)
        out["loader"][str(size)] = row
        print(f"  loader {size} px: {json.dumps(row['images_per_cpu_s'])} images/CPU-s, cached/none "
              f"{row['cached_over_none']:.3f}; {row['piece_read_ms']:.1f} ms CPU per piece read", flush=True)
    # step pairs per student (``pair_quartiles``: one pair's spread): 200 of cit_nano's ~75 ms steps, 60 of cit_tiny's
    runs = [(arch, m28, c28, arch, batch, (), 1 if quick else reps)
            for arch, reps in ((("cit_nano", 200),) if quick else (("cit_nano", 200), ("cit_tiny", 60)))]
    # the paper's student at 224 px, C = 1000, batch 8 (as in --part paper224), on the same fixed-batch footing
    runs.append(("cit_tiny@224px", m224, c224, "cit_tiny", 2 if quick else 8,
                 (*spec_sets(SPEC224), "data.verify_shards=false"), 1 if quick else 40))
    for name, manifest, cache, arch, size, sets, reps in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ps = {m: prepare(run_config(manifest, cache, arch, m, size, 0, 1, {}, sets)) for m in ("none", "cached")}
        one = next(iter(make_loader(ps["cached"].train_set, size, 0, pin_memory=False)))
        row = out["step"][name] = step_ratio(ps, one.to(ps["cached"].runtime.device), reps=reps,
                                             warmup=1 if quick else 2)
        row["adamw_step_ms"] = adamw_step_ms(ps["cached"].student, ps["cached"].cfg.train.weight_decay, reps)
        print(f"  step {name}: cached/none {row['step_cached_over_none']:.3f}; AdamW step "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in row["adamw_step_ms"].items()), flush=True)
    return out


MEMORY_STUDENT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 32}   # the data path is measured


def memory_child(stage: str, manifest: str, cache: str, workers: int) -> dict:
    """``train``: one cached-KD epoch of a cut-down cit_nano from ``cache``; ``build``: build ``cache`` (one view,
    the two default teachers, random weights, from the folder beside it).  Peak RSS (MiB) of this process and of its
    workers: meaningful in a fresh process (``--memory-child``), which prints it."""
    baseline = vm_hwm_mib()
    if stage == "build":
        from cache_builder.build import build_cache
        teachers = make_teachers(os.path.dirname(cache))
        build_cache(manifest, teachers, cache, views=1, topk=10, spec=SPEC, seed=0, progress=False, workers=workers)
    else:
        from trainer.train import train
        cfg = run_config(manifest, cache, "cit_nano", "cached", 64, workers, 1, {})
        cfg.student.options = dict(MEMORY_STUDENT)
        with tempfile.TemporaryDirectory() as out:
            train(cfg, out)
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so it would report the (large) benchmark parent that forked
    # this process.  Workers are forked from this process, so their peak includes the pages they share with it.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": vm_hwm_mib(), "rss_after_imports_mib": baseline, "worker_peak_rss_mib": children}


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_curve(folder: str, sizes: list[int], workers: int, stage: str = "train", fresh: bool = True) -> list[dict]:
    """Peak RSS of a fresh ``stage`` (train | build) process per dataset size; ``fresh=False`` (``--quick``): the
    same work in this process, which checks the code path without the interpreter start (its RSS means nothing)."""
    rows = []
    for n in sizes:
        sub = os.path.join(folder, f"{stage}{n}")
        manifest = make_data(sub, n, shard_size=1024, seed=n)
        cache = os.path.join(sub, "cache.zarr")
        if stage == "train":
            write_random_cache(cache, manifest, views=1)
        started = time.perf_counter()
        if fresh:
            proc = subprocess.run([sys.executable, __file__, "--memory-child", stage, manifest, cache, str(workers)],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            peaks = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            peaks = memory_child(stage, manifest, cache, workers)
        rows.append({"samples": n, **peaks, "seconds": time.perf_counter() - started})
        print(f"  {stage} memory: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 min")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/train.json"))
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the memory runs")
    parser.add_argument("--memory-only", nargs="?", const="train,build", metavar="STAGES",
                        help="measure only the memory curves (train, build or both) and update them in an existing "
                             "--out JSON")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("all", "join", "paper224"), default="all",
                        help="all: throughput and memory; join: where a cached-KD step could cost more: the loader "
                             "cached/none at 28 and 224 px and the step cached/none on a fixed batch; paper224: the "
                             "paper's 224 px setting (RegNetY-4GF + RedNet teachers)")
    parser.add_argument("--inv", default="rednet26", help="paper224: RedNet teachers, comma-separated "
                        "(rednet26,rednet101)")
    args = parser.parse_args()
    if args.memory_child:
        stage, manifest, cache, workers = args.memory_child
        print(json.dumps(memory_child(stage, manifest, cache, int(workers))))
        return
    if args.memory_only:
        with open(args.out) as f:
            result = json.load(f)
        with tempfile.TemporaryDirectory() as folder:
            sizes = [64] if args.quick else [1000, 4000, 16000]
            for stage in args.memory_only.split(","):
                key = {"train": "memory", "build": "build_memory"}[stage]
                result[key] = memory_curve(folder, sizes, args.workers, stage=stage, fresh=not args.quick)
        atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"updated the memory curves in {args.out}")
        return
    if args.part != "all":
        part_main(args)
        return
    quick = args.quick
    n, rounds, batch = (64, 1, 16) if quick else (512, 2, 32)
    sizes = [64] if quick else [1000, 4000, 16000]   # quick: one point per curve (the code path, not the curve)
    archs = ("cit_nano",) if quick else ("cit_nano", "cit_tiny")
    result = {"machine": machine_info(),
              "settings": {"quick": quick, "samples": n, "rounds": rounds, "batch_size": batch,
                           "memory_workers": args.workers, "threads": torch.get_num_threads(),
                           "teachers": {"conv": CONV_TEACHER[0], "inv": INV_TEACHER[0]}},
              "throughput": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        manifest, checkpoints, cache = throughput_world(folder, n, rounds, args.workers)
        print(f"data, teachers and cache ready ({time.perf_counter() - started:.0f} s)", flush=True)
        for arch in archs:
            modes = ("none", "cached", "online")
            print(f"throughput {arch} ...", flush=True)
            result["throughput"][arch] = throughput(manifest, cache, checkpoints, arch, rounds, batch, modes)
            r = result["throughput"][arch]
            print(f"  {arch}: " + ", ".join(f"{m} {r[m]['samples_per_s']:.1f}/s" for m in modes)
                  + f"; cached/none {r['cached_over_none']:.3f} (paired {r['cached_over_none_paired_median']:.3f})"
                  + f", cached/online {r['cached_over_online']:.2f} (paired {r['cached_over_online_paired_median']:.2f})",
                  flush=True)
        print("memory ...", flush=True)
        result["memory"] = memory_curve(folder, sizes, args.workers, fresh=not quick)
        result["build_memory"] = memory_curve(folder, sizes, args.workers, stage="build", fresh=not quick)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


def part_main(args) -> None:
    """``--part join`` / ``--part paper224``: one part, written to ``--out`` (default ``results/train_<part>.json``)."""
    out_path = args.out if args.out != os.path.join(REPO, "benchmarks/results/train.json") else \
        os.path.join(REPO, f"benchmarks/results/train_{args.part}{'_quick' if args.quick else ''}.json")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "cuda": torch.cuda.is_available(), "loadavg_start": os.getloadavg()},
              "settings": {"quick": args.quick, "part": args.part, "threads": torch.get_num_threads(),
                           "command": " ".join([os.path.basename(sys.executable), *sys.argv])}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        if args.part == "join":
            result["join"] = join_part(folder, args.quick)
        else:
            invs = tuple(x for x in args.inv.split(",") if x)
            unknown = [x for x in invs if x not in PAPER_INV]
            if unknown:
                print(f"bench_train.py: --inv {','.join(unknown)} is not one of {', '.join(PAPER_INV)}",
                      file=sys.stderr)
                sys.exit(2)
            result["paper224"] = paper224(folder, args.quick, invs)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    atomic_write_text(out_path, json.dumps(result, indent=1))
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
