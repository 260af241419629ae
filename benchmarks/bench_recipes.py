"""Distillation recipes for the CiT student from one cache: the temperature sweep, weight schedules, and the
one-head KD and hard-distillation baselines.

One cache of the claims benchmark's two teachers (``regnet`` conv, ``rednet`` involution) over E views that stores
the targets exactly at τ = 1, 2 and 4 (``cit cache build --temperatures 1,2,4``), and cit_nano trained from it under
every row below, on paired seeds (same seed = same initial weights, views and batch order):

  temperature   CiT (Eq. 1) with τ1 = τ2 = 1 (the paper's), 2, 4 — every one exact from the cache
  schedule      CiT, the distillation weights λ1, λ2 constant (= τ 1), decayed linearly or by a cosine to 0
  features      CiT plus feature KD or relation KD from a cache that also holds the teachers' pooled features
                (``--features pooled``; the same views and logit targets as the logits-only cache)
  baseline      one-head KD (α = 0.5, τ = 1, the two teachers averaged on the class head); DeiT hard distillation
                (each distillation head fits its teacher's top-1 class); no KD (reference)

A row is a base config in ``configs/ablation/`` plus overrides; a recipe that needs another cache (feature or
relation KD from a ``--features pooled`` cache) is a row with its own ``cache`` key (see ``lowdata.CACHES``).

    python benchmarks/bench_recipes.py --prepare-only
    python benchmarks/bench_recipes.py --part 0/2 & python benchmarks/bench_recipes.py --part 1/2
    python benchmarks/bench_recipes.py                                    # finds every run; the JSON
    python benchmarks/bench_recipes.py --quick --out /tmp/recipes.json    # smoke run (tiny student, 1 epoch)
"""
from __future__ import annotations

import os
import time

from common import machine, summarize, write_result
from lowdata import Variant, paired, parse_args, settings, train_rows

EPOCHS, TEACHER_EPOCHS = 6, 20
TINY = ("student.options.embed_dim=32", "student.options.depth=1", "student.options.num_heads=2")

# stage 0 (the temperature sweep) trains at every seed before stage 1
VARIANTS = [
    Variant("tau1", "temperature", "CiT, τ = 1 (constant weights)", "cit", ("loss.tau1=1.0", "loss.tau2=1.0")),
    Variant("tau2", "temperature", "CiT, τ = 2", "cit", ("loss.tau1=2.0", "loss.tau2=2.0")),
    Variant("tau4", "temperature", "CiT, τ = 4", "cit", ("loss.tau1=4.0", "loss.tau2=4.0")),
    Variant("linear", "schedule", "CiT, λ1, λ2 linear decay to 0", "cit",
            ('objective.schedule="linear"', "objective.final=0.0"), stage=1),
    Variant("cosine", "schedule", "CiT, λ1, λ2 cosine decay to 0", "cit",
            ('objective.schedule="cosine"', "objective.final=0.0"), stage=1),
    Variant("kd", "baseline", "one-head KD, α = 0.5, τ = 1, teachers averaged", "cit",
            ('objective.recipe="kd"', "objective.alpha=0.5", "objective.tau=1.0"), stage=1),
    Variant("hard", "baseline", "hard distillation (teachers' top-1 on the conv / inv heads)", "cit",
            ('objective.recipe="hard"',), stage=1),
    Variant("no_kd", "baseline", "no KD (class head on labels)", "none", cache="", stage=1),
    Variant("features", "features", "CiT + feature KD (β = 1: MSE of a learned projection to the teachers' pooled "
            "features)", "cit", ("objective.feature_weight=1.0",), cache="features", stage=1),
    Variant("relation", "features", "CiT + relation KD (γ = 1: MSE of the batch cosine-similarity matrices)", "cit",
            ("objective.relation_weight=1.0",), cache="features", stage=1),
]
# (question, better, worse): each answered on paired seeds
COMPARISONS = [
    ("τ = 2 vs τ = 1", "tau2", "tau1"), ("τ = 4 vs τ = 1", "tau4", "tau1"), ("τ = 4 vs τ = 2", "tau4", "tau2"),
    ("linear decay vs constant", "linear", "tau1"), ("cosine decay vs constant", "cosine", "tau1"),
    ("cosine vs linear decay", "cosine", "linear"),
    ("CiT (three heads) vs one-head KD", "tau1", "kd"), ("CiT (soft) vs hard distillation", "tau1", "hard"),
    ("feature KD + logits vs logits only", "features", "tau1"), ("relation KD + logits vs logits only", "relation", "tau1"),
    ("CiT vs no KD", "tau1", "no_kd"), ("one-head KD vs no KD", "kd", "no_kd"), ("hard vs no KD", "hard", "no_kd"),
]


def variants(quick: bool) -> list[Variant]:
    if not quick:
        return VARIANTS
    return [Variant(v.name, v.group, v.label, v.config, v.sets + TINY, v.cache, v.stage) for v in VARIANTS]


def verdict(d: dict) -> str:
    if d["n"] < 2:
        return "one seed: not decided"
    return ("better" if d["mean"] > 0 else "worse") if abs(d["mean"]) > d["std"] else "within seed spread"


def weight_logs(runs: dict) -> dict:
    """The per-epoch mean distillation weights a scheduled run logged (``w_kd_conv``, ...), first seed."""
    import json
    out = {}
    for name in ("linear", "cosine"):
        for r in runs.get(name, [])[:1]:
            with open(os.path.join(r["run"], "metrics.jsonl")) as f:
                epochs = [json.loads(line) for line in f if line.strip()]
            out[name] = {k: [e.get(k) for e in epochs] for k in epochs[0] if k.startswith("train_w_")}
    return out


def main() -> None:
    args = parse_args(__doc__, "recipes", EPOCHS, TEACHER_EPOCHS)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    trained = train_rows(args, variants(args.quick))
    if trained is None:
        return
    rows, world, runs = trained
    comparisons = []
    for question, better, worse in COMPARISONS:
        d = paired(runs, better, worse)
        if d is not None:
            comparisons.append({"question": question} | d | {"verdict": verdict(d)})
    result = {"benchmark": "recipes", "machine": machine(load_start),
              "settings": settings(args, world, "cit_nano (configs/fmnist_lowdata.toml)"),
              "teachers": world.teachers, "cache": world.caches["logits"], "runs": runs,
              "summary": summarize(runs, rows), "comparisons": comparisons, "weights_logged": weight_logs(runs),
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, result)
    for name, s in result["summary"].items():
        print(f"{name:8s} {100 * s['acc_cls_mean']:6.2f} ± {100 * s['acc_cls_std']:4.2f}   "
              f"mean of heads {100 * s['acc_mean_heads_mean']:6.2f} ± {100 * s['acc_mean_heads_std']:4.2f}")
    for c in comparisons:
        print(f"{c['question']:34s} {100 * c['mean']:+.2f} (n={c['n']}) {c['verdict']}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
