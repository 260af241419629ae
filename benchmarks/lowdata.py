"""What the family and recipe benchmarks share: low-data Fashion-MNIST, the conv + involution teacher pair of the
claims benchmark, one cache of both teachers that holds the KD targets exactly at τ = 1, 2 and 4, and a table of
variants trained on paired seeds.

Every variant is a row: a base config in ``configs/ablation/`` plus ``section.key=value`` overrides, so a new
recipe (say feature KD from a ``--features pooled`` cache) is one more row.  The plan is seed-major (a stopped run
has every variant at fewer seeds) and resumable (a finished run is reused from ``--workdir``); ``--part I/N`` runs
every N-th student so that N single-thread processes share the machine, and the plain command afterwards finds
every run done and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from bench_claims import TEACHERS as CLAIMS_TEACHERS
from common import (ROOT, accuracy_arguments, base_sets, build_timed, fill_defaults, mean_std, parse_part,
                    prepare_fmnist, run_student, train_teachers, write_result)

TEACHERS = [t for t in CLAIMS_TEACHERS if t.name in ("regnet", "rednet")]   # conv RegNetY-200MF, inv RedNet-small
PAIR = {"conv": "regnet", "inv": "rednet"}
TEMPERATURES = (1.0, 2.0, 4.0)
# The caches rows can read, by key: ``build_cache`` keywords besides data, teachers, views and top-K.  A feature-KD
# row would add e.g. "features": {"temperatures": TEMPERATURES, "features": "pooled"} and read cache="features".
CACHES: dict[str, dict] = {"logits": {"temperatures": TEMPERATURES},
                           "features": {"temperatures": TEMPERATURES, "features": "pooled"}}


@dataclass(frozen=True)
class Variant:
    """One row: ``configs/ablation/<config>.toml`` with ``sets``, reading cache ``cache`` (a ``CACHES`` key; "" for
    rows that read no teacher: they see the same views, as view t of a sample is rendered from the view seed)."""
    name: str
    group: str
    label: str
    config: str
    sets: tuple[str, ...] = ()
    cache: str = "logits"
    stage: int = 0          # the plan trains stage 0 at every seed before stage 1 (what matters most first)


@dataclass
class World:
    """The trained teachers, the data and the cache every row of a benchmark shares."""
    work: str
    train_json: str
    test_json: str
    teachers: dict
    caches: dict            # CACHES key -> the built cache's description (build_timed)


def parse_args(description: str, name: str, epochs: int, teacher_epochs: int, extra=None) -> argparse.Namespace:
    """The accuracy benchmarks' options plus the plan's; ``extra(ap)`` adds a script's own."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy_arguments(ap, name, epochs=epochs)
    ap.set_defaults(workdir="/tmp/cit-lowdata")
    ap.add_argument("--only", help="comma-separated variant names (default: all)")
    ap.add_argument("--prepare-only", action="store_true", help="data, teachers and cache, then stop")
    ap.add_argument("--part", default="0/1", help="I/N: train only the student runs i with i %% N == I")
    ap.add_argument("--collect", action="store_true", help="train nothing: write the JSON from the finished runs")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per student run [0: in-process]")
    ap.add_argument("--batch-size", type=int, default=32, help="student batch size [32: twice the optimiser steps "
                    "of the claims benchmark's 64 per epoch, for the short schedule]")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    parse_part(ap, args)
    fill_defaults(args, {"seeds": (3, 1), "per_class": (100, 5), "epochs": (epochs, 1),
                         "teacher_epochs": (teacher_epochs, 1), "test_samples": (5000, 100)})
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return args


def prepare(args, variants: list[Variant]) -> World:
    """Data, the two teachers (reused) and the caches of E views the rows read (each built once, by the plain or
    ``--prepare-only`` command)."""
    work = os.path.join(args.workdir, f"pc{args.per_class}" + ("-quick" if args.quick else ""))
    train_json, test_json = prepare_fmnist(work, args.per_class, args.test_samples, source=args.source,
                                           shard_size=100 if args.quick else 500)
    teachers = train_teachers(work, TEACHERS, train_json, test_json, args.teacher_epochs)
    from trainer.train import load_run_config
    spec = load_run_config(os.path.join(ROOT, "configs", "fmnist_lowdata.toml"), []).augment
    caches = {}
    for key in sorted({v.cache for v in variants if v.cache}):
        stem = os.path.join(work, "caches", f"{key}-E{args.epochs}-te{args.teacher_epochs}")
        if not os.path.exists(stem + ".json"):
            if args.parts > 1:
                raise SystemExit(f"no cache at {stem}.zarr: run with --prepare-only first, then the parts")
            write_result(stem + ".json", build_timed(stem + ".zarr", train_json, teachers, spec, args.epochs,
                                                     topk=10, **CACHES[key]))
        with open(stem + ".json") as f:
            caches[key] = json.load(f)
    return World(work, train_json, test_json, teachers, caches)


def schedule(args, seed: int) -> list[str]:
    """E epochs (= views), warm-up 10% of them, one evaluation at the end."""
    return [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", f"train.seed={seed}",
            f"train.batch_size={args.batch_size}",
            f"train.warmup_epochs={0 if args.quick else max(1, round(args.epochs / 10))}"]


def variant_sets(args, world: World, v: Variant, seed: int) -> list[str]:
    sets = base_sets(world.train_json, world.test_json, workers=args.workers) + schedule(args, seed)
    if v.cache:
        sets.append(f"data.cache={json.dumps(world.caches[v.cache]['url'])}")
    else:
        sets += ['data.cache=""', f"data.views={args.epochs}"]
    return sets + list(v.sets)


def claim(out: str) -> bool:
    """Take run folder ``out`` for this process (False: a live process has it).  Parts with different plans (other
    ``--only`` or ``--seeds``) may meet on a run; the first one trains it."""
    from shared.io import atomic_write_text
    from shared.store_lock import pid_alive
    path = out.rstrip("/") + ".claim"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        if pid != os.getpid() and pid_alive(pid):
            return False
    except (FileNotFoundError, ValueError):
        pass                                   # no claim, or its process is gone: take it over
    atomic_write_text(path, str(os.getpid()))
    return True


def run_plan(args, world: World, variants: list[Variant], on_run=None) -> dict[str, list]:
    """Train this part's rows, stage by stage and seed-major within a stage; {variant: [run records]} of the runs
    this process trained or found (``--collect``: found only)."""
    runs: dict[str, list] = {}
    plan = [(seed, v) for stage in sorted({v.stage for v in variants}) for seed in range(args.seeds)
            for v in variants if v.stage == stage]
    for i, (seed, v) in enumerate(plan):
        if i % args.parts != args.part_index:
            continue
        out = os.path.join(world.work, "runs",
                           f"{v.name}-E{args.epochs}-b{args.batch_size}-te{args.teacher_epochs}-s{seed}")
        done = os.path.exists(os.path.join(out, "run.json"))
        if not done and (args.collect or not claim(out)):
            continue
        started = time.process_time()
        r = run_student(out, os.path.join(ROOT, "configs", "ablation", f"{v.config}.toml"),
                        variant_sets(args, world, v, seed))
        runs.setdefault(v.name, []).append({"seed": seed, "run": out} | r)
        print(f"{v.name:22s} seed {seed}: cls {r['acc_cls']:.4f}  mean {r['acc_mean'] or 0:.4f}  ({r['seconds']} s"
              f", {time.process_time() - started:.0f} CPU-s in this process)", flush=True)
        if on_run is not None:
            on_run(runs)
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    return runs


def selected(args, variants: list[Variant]) -> list[Variant]:
    if not args.only:
        return variants
    names = set(args.only.split(","))
    unknown = names - {v.name for v in variants}
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)}; known: {[v.name for v in variants]}")
    return [v for v in variants if v.name in names]


def train_rows(args, variants: list[Variant]) -> tuple[list[Variant], World, dict] | None:
    """The selected rows, their world, and their finished runs (training what is missing); None when this process
    only prepares or trains one part.  No finished run at all is one line and exit 2."""
    rows = selected(args, variants)
    world = prepare(args, rows)
    if args.prepare_only:
        return None
    runs = run_plan(args, world, rows)
    if args.parts > 1:
        return None
    if not runs:
        print(f"no finished runs under {world.work}/runs: run without --collect first", file=sys.stderr)
        raise SystemExit(2)
    return rows, world, runs


def paired(runs: dict, better: str, worse: str, key: str = "acc_cls") -> dict | None:
    """acc(better) − acc(worse) over the seeds both ran: mean, sample std, n."""
    a = {r["seed"]: r[key] for r in runs.get(better, [])}
    b = {r["seed"]: r[key] for r in runs.get(worse, [])}
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not diffs:
        return None
    m, sd = mean_std(diffs)
    return {"better": better, "worse": worse, "mean": m, "std": sd if len(diffs) > 1 else None, "n": len(diffs)}


def settings(args, world: World, student: str) -> dict:
    from common import command
    return {"quick": args.quick, "dataset": "fashion-mnist", "per_class": args.per_class,
            "test_samples": args.test_samples or 10000, "views_E": args.epochs, "student_epochs": args.epochs,
            "teacher_epochs": args.teacher_epochs, "seeds": args.seeds, "view_seed": 0, "topk_cached": 10,
            "temperatures_cached": list(TEMPERATURES), "student": student, "batch_size": args.batch_size,
            "command": command()}
