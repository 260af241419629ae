"""The paper's claims, reproduced at small scale on low-data Fashion-MNIST.

One cache of three trained teachers — ``regnet`` (conv, RegNetY-200MF), ``rednet`` (involution, RedNet-small) and
``regnetx`` (a second conv teacher, RegNetX-200MF) — over E views, and the cit_nano student trained from it under
every variant, with the same views and the same student seeds across variants:

  teachers (Tables 4, 6)   no KD · conv only · involution only · conv + conv · conv + involution (CiT)
  tokens (Table 7)         CiT with both teachers on one token (the class token) vs three tokens
  token mode (Table 8)     ``random`` vs ``align`` conv/involution tokens
  cache size               top-K = 1, 5 with the tail spread uniformly or dropped (renormalised); K = 10 (all) is CiT
  parity                   cached vs online KD on identical views
  robustness (Tables 5, 9) CiT and no-KD students against both teachers on six corrupted test sets (severity 3):
                           accuracy of every token and KL(teacher ‖ token)

Every variant is a config in ``configs/ablation/`` (plus ``loss.topk`` / ``loss.tail`` overrides for the cache-size
rows).  Runs, teachers and the cache are reused from ``--workdir`` when present, so an interrupted run resumes; the
JSON is rewritten after every student run.  On a small CPU, two single-thread processes train more students per
hour than one two-thread process: run ``--prepare-only`` once, then ``--part 0/2`` and ``--part 1/2`` side by side,
then the plain command, which finds every run done, evaluates robustness and writes the JSON.

    python benchmarks/bench_claims.py --out benchmarks/results/claims.json        # ~1.5 h on 2 CPU cores
    python benchmarks/bench_claims.py --quick --out /tmp/claims-quick.json        # smoke run (< 1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

from common import (ROOT, Teacher, accuracy_arguments, base_sets, build_timed, command, fill_defaults, machine,
                    parse_part, prepare_fmnist, run_student, schedule_sets, summarize, train_teachers, write_result)

TEACHERS = [Teacher("regnet", "regnety_002", "conv", {"small_input": True}),
            Teacher("rednet", "rednet_small", "inv"),
            Teacher("regnetx", "regnetx_002", "conv", {"small_input": True})]


@dataclass(frozen=True)
class Variant:
    name: str
    group: str          # the table it belongs to
    label: str
    config: str         # configs/ablation/<config>.toml
    sets: tuple[str, ...] = ()


VARIANTS = [
    Variant("no_kd", "teachers", "no KD", "none"),
    Variant("conv", "teachers", "conv teacher only", "conv_only"),
    Variant("inv", "teachers", "involution teacher only", "inv_only"),
    Variant("conv_conv", "teachers", "conv + conv", "two_conv"),
    Variant("cit", "teachers", "conv + involution (CiT)", "cit"),
    Variant("one_token", "tokens", "CiT, one token", "one_token"),
    Variant("random_tokens", "token_mode", "CiT, random tokens", "random_tokens"),
    Variant("k1", "topk", "top-1, uniform tail", "cit", ("loss.topk=1",)),
    Variant("k1_renorm", "topk", "top-1, renormalised (hard label)", "cit", ("loss.topk=1", 'loss.tail="renormalize"')),
    Variant("k5", "topk", "top-5, uniform tail", "cit", ("loss.topk=5",)),
    Variant("k5_renorm", "topk", "top-5, renormalised", "cit", ("loss.topk=5", 'loss.tail="renormalize"')),
    Variant("online", "parity", "CiT, online teachers", "cit_online"),
]
ROBUSTNESS = ("cit", "no_kd")          # variants evaluated on the corrupted test sets against the teachers


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy_arguments(ap, "claims", epochs=30)
    ap.add_argument("--only", help="comma-separated variant names (default: all)")
    ap.add_argument("--prepare-only", action="store_true", help="data, teachers and cache, then stop")
    ap.add_argument("--part", default="0/1", help="I/N: train only the student runs i with i %% N == I")
    ap.add_argument("--workers", type=int, help="DataLoader workers per student run [1; quick 0]")
    args = ap.parse_args()
    parse_part(ap, args)
    fill_defaults(args, {"seeds": (3, 1), "per_class": (100, 5), "epochs": (30, 1), "teacher_epochs": (40, 1),
                         "test_samples": (0, 100), "workers": (1, 0)})
    return args


def student_sets(args, cache: dict, teachers: dict, seed: int) -> list[str]:
    return schedule_sets(args, seed) + [f"data.cache={json.dumps(cache['url'])}"] + [
        f"kd.checkpoints.{n}={json.dumps(t['path'])}" for n, t in teachers.items()]   # used by online only


def robustness(work: str, runs: dict, teachers: dict, test_json: str, corrupt_dir: str, quick: bool) -> dict:
    """Tokens vs teachers on the clean and corrupted test sets, every seed of the ROBUSTNESS variants, one pass."""
    from trainer.evaluate import evaluate_agreement
    students = {f"{v}/s{r['seed']}": r["checkpoint"] for v in ROBUSTNESS for r in runs.get(v, [])}
    pair = {n: teachers[n]["path"] for n in ("regnet", "rednet")}
    path = os.path.join(work, "robustness.json")
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        if report["students"] == students and report["teachers"] == pair:
            return report
    return evaluate_agreement(students, pair, [test_json], corrupt_dir=None if quick else corrupt_dir,
                              num_workers=0 if quick else 1, device="cpu", out=path)


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    work = os.path.join(args.workdir, f"pc{args.per_class}" + ("-quick" if args.quick else ""))
    train_json, test_json = prepare_fmnist(work, args.per_class, args.test_samples, corruptions=not args.quick,
                                           source=args.source, shard_size=100 if args.quick else 500)
    teachers = train_teachers(work, TEACHERS, train_json, test_json, args.teacher_epochs)

    from trainer.train import load_run_config
    spec = load_run_config(os.path.join(ROOT, "configs", "fmnist_lowdata.toml"), []).augment
    cache_url = os.path.join(work, "caches", f"E{args.epochs}.zarr")
    cache_info = os.path.join(work, "caches", f"E{args.epochs}.json")
    if not os.path.exists(cache_info):
        if args.parts > 1:
            raise SystemExit(f"no cache at {cache_url}: run with --prepare-only first, then the parts")
        info = build_timed(cache_url, train_json, teachers, spec, args.epochs, topk=10)
        write_result(cache_info, info)
    with open(cache_info) as f:
        cache = json.load(f)
    if args.prepare_only:
        return

    only = set(args.only.split(",")) if args.only else None
    variants = [v for v in VARIANTS if only is None or v.name in only]
    runs: dict[str, list] = {}
    settings = {"quick": args.quick, "dataset": "fashion-mnist", "per_class": args.per_class,
                "test_samples": args.test_samples or 10000, "views_E": args.epochs, "student_epochs": args.epochs,
                "teacher_epochs": args.teacher_epochs, "seeds": args.seeds, "view_seed": 0, "topk_cached": 10,
                "student": "cit_nano (configs/fmnist_lowdata.toml)", "batch_size": 64, "command": command()}

    def save(extra: dict | None = None) -> None:
        write_result(args.out, {"benchmark": "claims", "machine": machine(load_start), "settings": settings,
                                "teachers": teachers, "cache": cache, "runs": runs, "summary": summarize(runs, VARIANTS),
                                "wall_seconds": round(time.perf_counter() - t0, 1)} | (extra or {}))

    plan = [(seed, v) for seed in range(args.seeds) for v in variants]   # seed-major: a stopped run has every
    for i, (seed, v) in enumerate(plan):                                   # variant, at fewer seeds
        if i % args.parts != args.part_index:
            continue
        out = os.path.join(work, "runs", f"{v.name}-E{args.epochs}-s{seed}")
        sets = base_sets(train_json, test_json, workers=args.workers) + student_sets(args, cache, teachers, seed)
        r = run_student(out, os.path.join(ROOT, "configs", "ablation", f"{v.config}.toml"), sets + list(v.sets))
        runs.setdefault(v.name, []).append({"seed": seed} | r)
        print(f"{v.name:14s} seed {seed}: cls {r['acc_cls']:.4f}  mean {r['acc_mean'] or 0:.4f}  "
              f"({r['seconds']} s)", flush=True)
        if args.parts == 1:
            save()
    if args.parts > 1:
        return
    corrupt_dir = os.path.join(work, "data", "corrupt")
    save({"robustness": robustness(work, runs, teachers, test_json, corrupt_dir, args.quick)})

    print("\nteachers: " + ", ".join(f"{n} {t['test_acc'] * 100:.1f}%" for n, t in teachers.items()))
    for name, s in summarize(runs, VARIANTS).items():
        print(f"{name:14s} {100 * s['acc_cls_mean']:6.2f} ± {100 * s['acc_cls_std']:4.2f}   "
              f"mean of heads {100 * s['acc_mean_heads_mean']:6.2f} ± {100 * s['acc_mean_heads_std']:4.2f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
