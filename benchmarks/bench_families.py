"""The paper's Tables 4 and 5 at small scale: which student family gains from which teachers, and how far each
stays from them.

Three student families of about cit_nano's size and step cost at 28 px — a ResNet-10-like CNN, a Mixer-Ti-like MLP
and a Transformer-Ti-like ViT, each timm's model with one linear head per distillation term on its pooled features —
× {no KD, conv teacher, involution teacher, conv + involution}, on low-data Fashion-MNIST with the claims
benchmark's teachers (``regnet`` RegNetY-200MF, ``rednet`` RedNet-small, trained with the same recipe) from one
cache, paired seeds (same seed = same views and batch order in every row).  Per row: top-1 of the class head and of
the mean of heads, and KL(teacher ‖ student) to each teacher on the test set (``trainer.evaluate
.evaluate_agreement``, τ = 1).  Findings tested, each on paired seeds: the transformer gains most from the two
teachers; the Mixer stays farthest from the teachers.

    python benchmarks/bench_families.py --prepare-only                     # data, teachers, the cache
    python benchmarks/bench_families.py --part 0/2 & python benchmarks/bench_families.py --part 1/2
    python benchmarks/bench_families.py                                    # finds every run; KL; the JSON
    python benchmarks/bench_families.py --quick --out /tmp/families.json   # smoke run (tiny students, 1 epoch)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from common import machine, mean_std, summarize, write_result
from lowdata import PAIR, Variant, World, paired, parse_args, settings, train_rows

EPOCHS, TEACHER_EPOCHS = 6, 20


@dataclass(frozen=True)
class Family:
    """A student family at this benchmark's size: its builder, options, and how it was scaled from the paper's."""
    name: str
    label: str
    arch: str
    options: dict
    scaled: str
    quick: dict = field(default_factory=dict)      # --quick: a tiny one


FAMILIES = [
    Family("resnet", "ResNet-10-like", "resnet10_student", {"channels": [20, 40, 80, 160], "stem_width": 16},
           "timm resnet10t (one basic block per stage, tiered deep stem, stride-1 stem at 28 px): stage widths "
           "64/128/256/512 -> 20/40/80/160, stem 32 -> 16", {"channels": [8, 8, 8, 8], "stem_width": 8}),
    Family("mixer", "Mixer-Ti-like", "mixer_ti_student", {"embed_dim": 96, "num_blocks": 7},
           "Mixer-Ti 12 blocks x 192 -> 7 blocks x 96 (4 px patches: 49 tokens at 28 px)",
           {"embed_dim": 32, "num_blocks": 1}),
    Family("vit", "Transformer-Ti-like", "vit_ti_student", {"embed_dim": 96, "depth": 5, "num_heads": 3},
           "DeiT-Ti 12 blocks x 192, 3 heads -> 5 blocks x 96, 3 heads (4 px patches, class-token pooling)",
           {"embed_dim": 32, "depth": 1, "num_heads": 2}),
]
# (key, label, base config in configs/ablation/, reads the cache, stage: no KD and conv + inv at every seed first)
TEACHER_ROWS = [("no_kd", "no KD", "none", "", 0), ("conv", "conv teacher", "conv_only", "logits", 1),
                ("inv", "involution teacher", "inv_only", "logits", 1),
                ("cit", "conv + involution", "cit", "logits", 0)]


def family_options(f: Family, quick: bool) -> dict:
    return f.quick if quick else f.options


def variants(quick: bool) -> list[Variant]:
    rows = []
    for f in FAMILIES:
        sets = (f'student.arch="{f.arch}"',) + tuple(
            f"student.options.{k}={json.dumps(v)}" for k, v in family_options(f, quick).items())
        rows += [Variant(f"{f.name}-{key}", f.name, f"{f.label}, {label}", config, sets, cache, stage)
                 for key, label, config, cache, stage in TEACHER_ROWS]
    return rows


def parameters(f: Family, quick: bool) -> dict:
    """Parameter counts of the family at 28 px, 1 channel, 10 classes: with one head and with three."""
    from shared.models import create_model
    out = {}
    for heads in (("cls",), ("cls", "conv", "inv")):
        model = create_model(f.arch, num_classes=10, in_chans=1, img_size=28, heads=heads, **family_options(f, quick))
        out[f"heads_{len(heads)}"] = sum(p.numel() for p in model.parameters())
    return out


def agreement(args, world: World, runs: dict) -> dict:
    """Every student's heads vs both teachers on the test set, one pass (reused when the students are the same)."""
    from trainer.demo import subset_manifest
    from trainer.evaluate import evaluate_agreement
    students = {f"{v}/s{r['seed']}": r["checkpoint"] for v, rs in runs.items() for r in rs}
    pair = {n: world.teachers[n]["path"] for n in PAIR.values()}
    test = subset_manifest(world.test_json, args.kl_samples) if args.kl_samples else world.test_json
    path = os.path.join(world.work, f"families-agreement-E{args.epochs}-te{args.teacher_epochs}.json")
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        if report["students"] == students and report["teachers"] == pair and report.get("data") == test:
            return report
    report = evaluate_agreement(students, pair, [test], num_workers=0, device="cpu") | {"data": test}
    write_result(path, report)
    return report


def kl_table(report: dict, variant_names: list[str]) -> dict:
    """{variant: {head: {teacher: {mean, std, values}}}} over seeds: KL(teacher ‖ head) on the test set, for the
    class head and the mean of heads (the student's prediction)."""
    st = next(iter(report["sets"].values()))["students"]
    out = {}
    for v in variant_names:
        labels = sorted(x for x in st if x.split("/")[0] == v)
        if not labels:
            continue
        out[v] = {}
        for head in ("cls", "mean"):
            out[v][head] = {}
            for t in PAIR.values():
                values = [st[x]["kl"][head][t] for x in labels]
                m, sd = mean_std(values)
                out[v][head][t] = {"mean": m, "std": sd, "values": values}
    return out


def runs_with_kl(runs: dict, report: dict) -> dict:
    """Each run record plus its mean-of-heads KL to each teacher (``kl_<teacher>``), for paired comparisons."""
    st = next(iter(report["sets"].values()))["students"]
    return {v: [r | {f"kl_{t}": st[f"{v}/s{r['seed']}"]["kl"]["mean"][t] for t in PAIR.values()} for r in rs]
            for v, rs in runs.items()}


def gains(runs: dict, family: str) -> dict:
    """Paired gains of the two-teacher student, per seed: over no KD (seeds both ran), and over the better single
    teacher (seeds all four rows ran)."""
    by = {k: {r["seed"]: r["acc_cls"] for r in runs.get(f"{family}-{k}", [])} for k, *_ in TEACHER_ROWS}
    both = sorted(set(by["cit"]) & set(by["no_kd"]))
    every = sorted(set(both) & set(by["conv"]) & set(by["inv"]))
    return {"over_no_kd": {s: by["cit"][s] - by["no_kd"][s] for s in both},
            "over_best_single": {s: by["cit"][s] - max(by["conv"][s], by["inv"][s]) for s in every}}


def verdict(diff: dict | None) -> str:
    """holds / reversed when the paired mean difference exceeds its seed-to-seed std, else within seed spread."""
    if diff is None:
        return "not run"
    if diff["n"] < 2:
        return "one seed: not decided"
    if abs(diff["mean"]) > diff["std"]:
        return "holds" if diff["mean"] > 0 else "reversed"
    return "within seed spread"


def _diff(values: list[float]) -> dict | None:
    if not values:
        return None
    m, sd = mean_std(values)
    return {"mean": m, "std": sd if len(values) > 1 else None, "n": len(values), "values": values}


def findings(runs: dict) -> dict:
    """The paper's two findings, tested on paired seeds.

    ``transformer_gains_most``: per seed, the ViT's gain from conv + inv (over no KD, and over its better single
    teacher) minus each other family's gain.  ``mixer_farthest``: per seed, the Mixer's mean-of-heads KL to each
    teacher minus each other family's, for the two-teacher students (positive = the Mixer is farther)."""
    g = {f.name: gains(runs, f.name) for f in FAMILIES}
    out: dict = {"gains": {n: {k: _diff(list(v.values())) for k, v in x.items()} for n, x in g.items()},
                 "transformer_gains_most": {}, "mixer_farthest": {}}
    for other in ("resnet", "mixer"):
        for kind in ("over_no_kd", "over_best_single"):
            a, b = g["vit"][kind], g[other][kind]
            d = _diff([a[s] - b[s] for s in sorted(set(a) & set(b))])
            out["transformer_gains_most"][f"vit_minus_{other}_{kind}"] = (d or {}) | {"verdict": verdict(d)}
    for other in ("resnet", "vit"):
        for t in PAIR.values():
            d = paired(runs, "mixer-cit", f"{other}-cit", key=f"kl_{t}")
            out["mixer_farthest"][f"mixer_minus_{other}_kl_{t}"] = (d or {}) | {"verdict": verdict(d)}
    return out


def kl_arguments(ap) -> None:
    ap.add_argument("--kl-samples", type=int, help="test images for the KL to the teachers, whole shards of the "
                    "test set, 0 = the accuracy test set [2000; quick 0]")


def main() -> None:
    args = parse_args(__doc__, "families", EPOCHS, TEACHER_EPOCHS, extra=kl_arguments)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    trained = train_rows(args, variants(args.quick))
    if trained is None:
        return
    rows, world, runs = trained
    if args.kl_samples is None:
        args.kl_samples = 0 if args.quick else 2000
    report = agreement(args, world, runs)
    runs = runs_with_kl(runs, report)
    fams = {f.name: {"label": f.label, "arch": f.arch, "options": family_options(f, args.quick), "scaled": f.scaled,
                     "params": parameters(f, args.quick)} for f in FAMILIES}
    from shared.models import create_model
    fams["cit_nano (reference)"] = {"label": "CiT nano (bench_claims' student)", "arch": "cit_nano", "options": {},
                                    "scaled": "", "params": {"heads_3": sum(
                                        p.numel() for p in create_model("cit_nano", num_classes=10, in_chans=1,
                                                                        img_size=28).parameters())}}
    result = {"benchmark": "families", "machine": machine(load_start),
              "settings": settings(args, world, "resnet / mixer / vit families (see families)")
              | {"kl_test_samples": next(iter(report["sets"].values()))["samples"]},
              "teachers": world.teachers, "cache": world.caches["logits"], "families": fams,
              "teacher_rows": {key: label for key, label, *_ in TEACHER_ROWS}, "runs": runs,
              "summary": summarize(runs, rows), "kl": kl_table(report, [v.name for v in rows]),
              "teacher_test_acc": next(iter(report["sets"].values()))["teachers"],
              "findings": findings(runs), "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, result)
    for name, s in result["summary"].items():
        kl = result["kl"].get(name, {}).get("mean", {})
        print(f"{name:14s} {100 * s['acc_cls_mean']:6.2f} ± {100 * s['acc_cls_std']:4.2f}  KL "
              + "  ".join(f"{t} {v['mean']:.3f}" for t, v in kl.items()))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
