"""Issue 6's measurement: Mixup/CutMix with cached teachers — exact cached vs approx cached vs exact online KD.

On low-data Fashion-MNIST: train (or reuse) one conv teacher and one involution teacher, build an ``exact`` cache
(teachers run on the mixed views) and an unmixed cache (same E views, K = 10), then train the same small CiT
student with

  (a) augment.mix=exact,  kd.mode=cached   (mixed views replayed; cached teachers saw the mixed image)
  (b) augment.mix=approx, kd.mode=cached   (unmixed cache; the trainer mixes the cached teacher distributions)
  (c) augment.mix=exact,  kd.mode=online   (teachers run live on the same mixed views)

with the same view seed for every run and the same student seeds across variants.  Reports mean ± std test accuracy
of the class head and of the mean of the heads, and the extra cost of the exact cache (build time, bytes).

    python benchmarks/bench_mixing.py --out benchmarks/results/mixing.json            # full (≈ 10 min, 2 cores)
    python benchmarks/bench_mixing.py --quick --out /tmp/mixing-quick.json           # smoke (< 1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cache_builder.build import build_cache  # noqa: E402
from shared.augment import ViewSpec  # noqa: E402
from shared.manifest import Manifest, ShardInfo  # noqa: E402
from trainer.teacher import TeacherSpec, train_teacher  # noqa: E402
from trainer.train import load_run_config, train  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "demo.toml")
TEACHERS = {"conv": ("regnety_002", "conv", {"small_input": True}), "inv": ("rednet_small", "inv", {})}
TOPK = 10
VARIANTS = {"exact_cached": ("exact", "cached"), "approx_cached": ("approx", "cached"),
            "exact_online": ("exact", "online")}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def prepare_data(work: str, per_class: int, test_samples: int) -> tuple[str, str]:
    data = os.path.join(work, "data")
    train_json, test_json = os.path.join(data, "train.json"), os.path.join(data, "test.json")
    if not os.path.exists(train_json):
        subprocess.run([sys.executable, "-m", "shared.cli", "data", "prepare", "fashion-mnist", "--out", data,
                        "--per-class", str(per_class), "--shard-size", "500", "--workers", "1"],
                       check=True, cwd=ROOT)
    # A fixed test subset (the first shards of the test split) keeps the per-epoch evaluation cheap.
    sub_json = os.path.join(data, f"test-{test_samples}.json")
    if not os.path.exists(sub_json):
        full = Manifest.load(test_json)
        shards, n = [], 0
        for s in full.shards:
            if n >= test_samples:
                break
            shards.append(ShardInfo(url=s.url, samples=s.samples, sha256=s.sha256))
            n += s.samples
        sub = Manifest(shards=shards, num_classes=full.num_classes, class_names=full.class_names,
                       name=full.name + f"[:{n}]", source=full.source)
        with open(sub_json, "w") as f:
            f.write(sub.to_json())
    return train_json, sub_json


def base_sets(train_json: str, test_json: str) -> list[str]:
    return [f"data.train={json.dumps(train_json)}", f"data.test={json.dumps(test_json)}", "data.num_workers=0",
            "data.view_seed=0", "train.progress=false", 'train.device="cpu"']


def get_teachers(work: str, train_json: str, test_json: str, epochs: int) -> dict:
    out = {}
    for name, (arch, kind, options) in TEACHERS.items():
        path = os.path.join(work, "teachers", f"{name}-e{epochs}.safetensors")
        started = time.perf_counter()
        reused = os.path.exists(path)
        if not reused:
            cfg = load_run_config(CONFIG, base_sets(train_json, test_json) + [f"train.epochs={epochs}", "data.views=0"])
            result = train_teacher(TeacherSpec(arch, kind, train_json, test_json, path, options), cfg)
            acc = result.history[-1].get("test_acc_cls")
            with open(path + ".acc.json", "w") as f:
                json.dump({"test_acc_cls": acc}, f)
        with open(path + ".acc.json") as f:
            acc = json.load(f)["test_acc_cls"]
        out[name] = {"arch": arch, "kind": kind, "path": path, "epochs": epochs, "test_acc": acc, "reused": reused,
                     "seconds": round(time.perf_counter() - started, 1)}
        print(f"teacher {name} ({arch}): test acc {acc:.4f}{' (reused)' if reused else ''}", flush=True)
    return out


def build(work: str, train_json: str, teachers: dict, spec: ViewSpec, views: int, tag: str) -> dict:
    out = os.path.join(work, "caches", f"{tag}-E{views}.zarr")
    shutil.rmtree(out, ignore_errors=True)       # always rebuilt: the build time is part of the measurement
    started = time.perf_counter()
    summary = build_cache(train_json, [(n, t["path"]) for n, t in teachers.items()], out, views=views, topk=TOPK,
                          spec=spec, seed=0, workers=0, progress=False, device="cpu")
    wall = time.perf_counter() - started
    rows = Manifest.load(train_json).num_samples
    size = dir_bytes(out)
    info = {"url": out, "build_seconds_wall": round(wall, 2), "build_seconds_units": round(summary.build_seconds, 2),
            "bytes": size, "bytes_per_view_per_teacher": round(size / (rows * views * len(teachers)), 2),
            "views_per_second": round(summary.steady_views_per_second, 1)}
    print(f"cache {tag}: {wall:.1f} s, {size / 1e6:.2f} MB", flush=True)
    return info


def student_sets(args) -> list[str]:
    sets = ['student.arch="cit_nano"', f"train.epochs={args.epochs}", "train.batch_size=64",
            'kd.conv_teacher="conv"', 'kd.inv_teacher="inv"']
    if args.student_dim:
        sets += [f"student.options.embed_dim={args.student_dim}", f"student.options.depth={args.student_depth}",
                 "student.options.num_heads=2", f"student.options.stem_width={args.student_stem}"]
    return sets


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mixing.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch, 1 seed (< 1 min)")
    ap.add_argument("--seeds", type=int, default=None, help="student seeds per variant [3; quick 1]")
    ap.add_argument("--per-class", type=int, default=None, help="training images per class [40; quick 5]")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs = cache views E [3; quick 1]")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="[3; quick 1]")
    ap.add_argument("--test-samples", type=int, default=None, help="test subset size [2000; quick 500]")
    ap.add_argument("--student-dim", type=int, default=64, help="student embed dim (0: stock cit_nano)")
    ap.add_argument("--student-depth", type=int, default=2)
    ap.add_argument("--student-stem", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/cit-bench-mixing")
    args = ap.parse_args()
    q = args.quick
    args.seeds = args.seeds or (1 if q else 3)
    args.per_class = args.per_class or (5 if q else 40)
    args.epochs = args.epochs or (1 if q else 3)
    args.teacher_epochs = args.teacher_epochs or (1 if q else 3)
    args.test_samples = args.test_samples or (500 if q else 2000)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    work = os.path.join(args.workdir, f"pc{args.per_class}")
    os.makedirs(work, exist_ok=True)
    train_json, test_json = prepare_data(work, args.per_class, args.test_samples)
    teachers = get_teachers(work, train_json, test_json, args.teacher_epochs)

    aug = load_run_config(CONFIG, []).augment.to_dict()
    plain = ViewSpec.from_dict(aug | {"mix": "off"})
    exact = ViewSpec.from_dict(aug | {"mix": "exact"})
    caches = {"unmixed": build(work, train_json, teachers, plain, args.epochs, "unmixed"),
              "exact": build(work, train_json, teachers, exact, args.epochs, "exact")}

    runs = {v: [] for v in VARIANTS}
    for seed in range(args.seeds):
        for variant, (mix, mode) in VARIANTS.items():
            cache = caches["unmixed" if mix == "approx" else "exact"]["url"]
            sets = base_sets(train_json, test_json) + student_sets(args) + [
                f'augment.mix="{mix}"', f"kd.mode={mode}", f"train.seed={seed}", f"data.cache={json.dumps(cache)}"]
            if mode == "online":
                sets += [f"kd.checkpoints.{n}={json.dumps(t['path'])}" for n, t in teachers.items()]
            out = os.path.join(work, "runs", f"{variant}-E{args.epochs}-s{seed}")
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            result = train(load_run_config(CONFIG, sets), out)
            last = result.history[-1]
            runs[variant].append({"seed": seed, "acc_cls": last["test_acc_cls"], "acc_mean": last.get("test_acc_mean"),
                                  "train_loss": last["train_loss"], "seconds": round(time.perf_counter() - started, 1)})
            print(f"{variant:14s} seed {seed}: cls {last['test_acc_cls']:.4f}  mean {last.get('test_acc_mean', 0):.4f}"
                  f"  ({runs[variant][-1]['seconds']} s)", flush=True)

    summary = {}
    for variant, rs in runs.items():
        c, m = mean_std([r["acc_cls"] for r in rs]), mean_std([r["acc_mean"] for r in rs])
        summary[variant] = {"acc_cls_mean": c[0], "acc_cls_std": c[1], "acc_mean_heads_mean": m[0],
                            "acc_mean_heads_std": m[1], "train_seconds_mean": statistics.mean(r["seconds"] for r in rs)}
    u, e = caches["unmixed"], caches["exact"]
    cost = {"extra_build_seconds_wall": round(e["build_seconds_wall"] - u["build_seconds_wall"], 2),
            "build_time_ratio": round(e["build_seconds_wall"] / u["build_seconds_wall"], 3),
            "extra_bytes": e["bytes"] - u["bytes"], "bytes_ratio": round(e["bytes"] / u["bytes"], 3)}
    wall = time.perf_counter() - t0
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "settings": {"quick": q, "dataset": "fashion-mnist", "per_class": args.per_class,
                     "train_samples": Manifest.load(train_json).num_samples,
                     "test_samples": Manifest.load(test_json).num_samples, "views_E": args.epochs,
                     "student_epochs": args.epochs, "topk": TOPK, "seeds": args.seeds, "view_seed": 0,
                     "student": {"arch": "cit_nano", "overrides": student_sets(args)[5:]},
                     "batch_size": 64, "augment": "configs/demo.toml [augment] + mix (mixup_alpha 0.8, cutmix_alpha 1.0,"
                     " mix_prob 1.0, switch 0.5, window 64)", "teacher_epochs": args.teacher_epochs,
                     "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])},
        "accuracy_note": "acc_cls = class-token head; acc_mean_heads = mean of the three heads' logits (official CiT "
                         "evaluation); final epoch, on the test subset; mean ± sample std over seeds",
        "teachers": teachers, "caches": caches, "exact_cache_cost": cost, "runs": runs, "summary": summary,
        "wall_seconds": round(wall, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    print(f"\n{'variant':16s} {'class head':>16s} {'mean of heads':>16s} {'train s':>8s}")
    for v, s in summary.items():
        print(f"{v:16s} {100 * s['acc_cls_mean']:7.2f} ± {100 * s['acc_cls_std']:5.2f}  "
              f"{100 * s['acc_mean_heads_mean']:7.2f} ± {100 * s['acc_mean_heads_std']:5.2f}  {s['train_seconds_mean']:8.1f}")
    print(f"\ncache   build s   bytes      bytes/view/teacher")
    for k, c in caches.items():
        print(f"{k:8s}{c['build_seconds_wall']:8.1f}  {c['bytes']:9d}  {c['bytes_per_view_per_teacher']:8.1f}")
    print(f"exact vs unmixed: +{cost['extra_build_seconds_wall']} s ({cost['build_time_ratio']}x), "
          f"+{cost['extra_bytes']} B ({cost['bytes_ratio']}x); wall {wall:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
