"""Mixup/CutMix with cached teachers — exact cached vs approx cached vs exact online KD.

On low-data Fashion-MNIST: reuse (or train) bench_claims.py's conv and involution teachers, build an ``exact`` cache
(teachers run on the mixed views) and an unmixed cache (same E views, K = 10), then train the same small CiT
student with

  (a) augment.mix=exact,  kd.mode=cached   (mixed views replayed; cached teachers saw the mixed image)
  (b) augment.mix=approx, kd.mode=cached   (unmixed cache; the trainer mixes the cached teacher distributions)
  (c) augment.mix=exact,  kd.mode=online   (teachers run live on the same mixed views)

with the same view seed for every run and the same student seeds across variants.  Reports mean ± std test accuracy
of the class head and of the mean of the heads, and the extra cost of the exact cache (build time, bytes).

    python benchmarks/bench_mixing.py --out benchmarks/results/mixing.json            # full (≈ 30 min, 2 cores)
    python benchmarks/bench_mixing.py --quick --out /tmp/mixing-quick.json           # smoke (< 1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import (ROOT, Teacher, accuracy_arguments, base_sets, build_timed, command, fill_defaults, machine,
                    mean_std, prepare_fmnist, run_student, schedule_sets, train_teachers, write_result)

CONFIG = os.path.join(ROOT, "configs", "ablation", "cit.toml")
TEACHERS = [Teacher("regnet", "regnety_002", "conv", {"small_input": True}), Teacher("rednet", "rednet_small", "inv")]
TOPK = 10
VARIANTS = {"exact_cached": ("exact", "cached"), "approx_cached": ("approx", "cached"),
            "exact_online": ("exact", "online")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy_arguments(ap, "mixing", epochs=20)      # same --workdir as bench_claims.py: same data and teachers
    args = ap.parse_args()
    q = args.quick
    fill_defaults(args, {"seeds": (3, 1), "per_class": (100, 5), "epochs": (20, 1), "teacher_epochs": (40, 1),
                         "test_samples": (0, 100)})
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    work = os.path.join(args.workdir, f"pc{args.per_class}" + ("-quick" if q else ""))
    train_json, test_json = prepare_fmnist(work, args.per_class, args.test_samples, corruptions=not q,
                                           source=args.source, shard_size=100 if q else 500)
    teachers = train_teachers(work, TEACHERS, train_json, test_json, args.teacher_epochs)

    from trainer.train import load_run_config
    from shared.augment import ViewSpec
    aug = load_run_config(CONFIG, []).augment.to_dict()
    # a throwaway one-view build first: imports, teacher loading and kernel warm-up would otherwise count against
    # whichever cache is built first
    build_timed(os.path.join(work, "caches", "mix-warmup.zarr"), train_json, teachers, ViewSpec.from_dict(aug), 1, TOPK)
    caches = {}
    for tag, mix in (("unmixed", "off"), ("exact", "exact")):
        caches[tag] = build_timed(os.path.join(work, "caches", f"mix-{tag}-E{args.epochs}.zarr"), train_json,
                                  teachers, ViewSpec.from_dict(aug | {"mix": mix}), args.epochs, TOPK)

    workers = 0 if q else 1
    runs = {v: [] for v in VARIANTS}
    for seed in range(args.seeds):
        for variant, (mix, mode) in VARIANTS.items():
            cache = caches["unmixed" if mix == "approx" else "exact"]["url"]
            sets = base_sets(train_json, test_json, workers) + schedule_sets(args, seed) + [
                f'augment.mix="{mix}"', f"kd.mode={mode}", f"data.cache={json.dumps(cache)}"]
            sets += [f"kd.checkpoints.{n}={json.dumps(t['path'])}" for n, t in teachers.items()]
            out = os.path.join(work, "runs", f"mix-{variant}-E{args.epochs}-s{seed}")
            r = run_student(out, CONFIG, sets)
            runs[variant].append({"seed": seed} | r)
            print(f"{variant:14s} seed {seed}: cls {r['acc_cls']:.4f}  mean {r['acc_mean'] or 0:.4f}"
                  f"  ({r['seconds']} s)", flush=True)

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
    write_result(args.out, {
        "benchmark": "mixing", "machine": machine(load_start),
        "settings": {"quick": q, "dataset": "fashion-mnist", "per_class": args.per_class,
                     "test_samples": args.test_samples or 10000, "views_E": args.epochs, "student_epochs": args.epochs,
                     "topk": TOPK, "seeds": args.seeds, "view_seed": 0, "teacher_epochs": args.teacher_epochs,
                     "student": "cit_nano (configs/ablation/cit.toml)", "batch_size": 64,
                     "augment": "configs/fmnist_lowdata.toml [augment] + mix (mixup_alpha 0.8, cutmix_alpha 1.0, "
                                "mix_prob 1.0, switch 0.5, window 64)", "command": command()},
        "accuracy_note": "acc_cls = class-token head; acc_mean_heads = mean of the three heads' logits (official CiT "
                         "evaluation); final epoch, full test set; mean ± sample std over seeds",
        "teachers": teachers, "caches": caches, "exact_cache_cost": cost, "runs": runs, "summary": summary,
        "wall_seconds": round(wall, 1)})

    print(f"\n{'variant':16s} {'class head':>16s} {'mean of heads':>16s} {'train s':>8s}")
    for v, s in summary.items():
        print(f"{v:16s} {100 * s['acc_cls_mean']:7.2f} ± {100 * s['acc_cls_std']:5.2f}  "
              f"{100 * s['acc_mean_heads_mean']:7.2f} ± {100 * s['acc_mean_heads_std']:5.2f}  {s['train_seconds_mean']:8.1f}")
    print("\ncache   build s   bytes      bytes/view/teacher")
    for k, c in caches.items():
        print(f"{k:8s}{c['build_seconds_wall']:8.1f}  {c['bytes']:9d}  {c['bytes_per_view_per_teacher']:8.1f}")
    print(f"exact vs unmixed: +{cost['extra_build_seconds_wall']} s ({cost['build_time_ratio']}x), "
          f"+{cost['extra_bytes']} B ({cost['bytes_ratio']}x); wall {wall:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
