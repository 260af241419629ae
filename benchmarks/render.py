"""Render ``benchmarks/results/*.json`` into the README's results section and PNG plots.

Every number in that section is read here from a JSON a committed benchmark command wrote; ``FIELDS`` lists what
each table reads, and ``tests/test_benchmarks.py`` checks that every committed JSON (and every ``--quick`` run) has
those fields.  The section sits between the two ``RESULTS_*`` markers in README.md and is replaced whole.

    python benchmarks/render.py                 # rewrite the README section and benchmarks/results/*.png
    python benchmarks/render.py --check         # exit 1 if the README section is stale
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
RESULTS_START, RESULTS_END = "<!-- RESULTS_START (benchmarks/render.py) -->", "<!-- RESULTS_END -->"

# What the README reads from each result, as dotted paths ("*" = every element of a list).
FIELDS: dict[str, list[str]] = {
    "train": ["throughput.cit_nano.cached_over_none_paired_median",
              "throughput.cit_nano.cached_over_online_paired_median", "memory.*.samples", "memory.*.peak_rss_mib",
              "build_memory.*.samples", "build_memory.*.peak_rss_mib"],
    "cache": ["commands.all.command", "throughput.ratio", "throughput.cpu_ratio", "bytes.results.*.classes",
              "bytes.results.*.topk", "bytes.results.*.teacher", "bytes.results.*.bytes_per_view_per_teacher",
              "targets.bytes_one_temperature", "targets.bytes_per_extra_temperature", "targets.worst_tail_abs_error"],
    "models_cpu": ["involution_vs_conv_twin.fwd_time_ratio", "involution_vs_conv_twin.fwd_bwd_step_time_ratio"],
    "loader": ["breakdown.cpu_us_per_image.total", "breakdown.images_per_cpu_second", "dataloader.*.workers", "dataloader.*.steady_images_per_s_per_worker"],
    "imagenet": ["settings.command", "loader.images_per_cpu_second_per_core", "bytes_per_view",
                 "projection.views", "projection.teachers", "projection.storage_by_k",
                 "projection.loader_core_hours_per_pass", "projection.teacher_gpu_hours_total",
                 "projection.assumptions"],
    "mixing": ["settings.command", "settings.per_class", "settings.views_E", "settings.seeds", "teachers",
               "summary.exact_cached.acc_cls_mean", "summary.exact_cached.acc_cls_std",
               "summary.approx_cached.acc_cls_mean", "summary.exact_online.acc_cls_mean",
               "exact_cache_cost.build_time_ratio", "exact_cache_cost.bytes_ratio"],
    "demo": ["settings.command", "wall_seconds", "runs.*.loadavg_start"],
    "suite": ["command", "wall_seconds", "cpu_seconds", "passed", "machine.loadavg_start"],
    "train_join": ["settings.command", "join.loader", "join.step", "join.step.cit_nano.adamw_step_ms.fused"],
    "train_paper224": ["settings.command", "paper224.student", "paper224.batch_size", "paper224.runs"],
    "grow": ["settings.command", "extend.ratio_vs_fresh", "add_teacher.ratio_vs_fresh"],
    "claims": ["settings.command", "settings.per_class", "settings.views_E", "settings.seeds", "teachers",
               "summary.cit.acc_cls_mean", "summary.cit.acc_cls_std", "summary.cit.acc_mean_heads_mean",
               "summary.no_kd.acc_cls_mean", "robustness.sets"],
    "students": ["settings.command", "settings.batch_size", "settings.threads", "families"],
    "families": ["settings.command", "settings.per_class", "settings.views_E", "settings.seeds",
                 "settings.teacher_epochs", "settings.test_samples", "settings.kl_test_samples", "settings.batch_size",
                 "teachers", "families", "teacher_rows", "summary",
                 "kl", "findings.gains", "findings.transformer_gains_most", "findings.mixer_farthest"],
    "recipes": ["settings.command", "settings.per_class", "settings.views_E", "settings.seeds",
                "settings.teacher_epochs", "settings.test_samples", "settings.batch_size", "teachers",
                "summary.tau1.acc_cls_mean",
                "summary.tau1.acc_cls_std", "comparisons"],
}


def get(data, path: str):
    """``data`` at a dotted ``path``; ``*`` maps over a list.  KeyError names the missing part."""
    node = data
    for i, part in enumerate(path.split(".")):
        if part == "*":
            rest = ".".join(path.split(".")[i + 1:])
            if not isinstance(node, list) or not node:
                raise KeyError(f"{path}: expected a non-empty list before '*'")
            return [get(item, rest) if rest else item for item in node]
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{path}: no {part!r}")
        node = node[part]
    return node


def missing_fields(name: str, data: dict) -> list[str]:
    """The FIELDS paths of result ``name`` that ``data`` lacks."""
    out = []
    for path in FIELDS[name]:
        try:
            get(data, path)
        except KeyError as exc:
            out.append(exc.args[0])
    return out


def load(name: str, results: str = RESULTS) -> dict | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def load_note(data: dict) -> str:
    la = data.get("machine", {}).get("loadavg_start") or data.get("machine", {}).get("loadavg_before")
    return f" (load average at start {la[0]:.1f})" if la else ""


# ----------------------------------------------------------------------------------------------------- tables

def speed_section(r: dict) -> list[str]:
    rows = []
    if r.get("train"):
        t = r["train"]["throughput"]
        rows.append(("student training, cached KD ÷ no KD, paired median per step (goal ≥ 0.97)",
                     "python benchmarks/bench_train.py",
                     ", ".join(f"{m} {t[m]['cached_over_none_paired_median']:.2f}" for m in t)))
        rows.append(("student training, cached KD ÷ online KD (regnety_002 + rednet_small)", "same",
                     ", ".join(f"{m} {t[m]['cached_over_online_paired_median']:.2f}×" for m in t)))
        for key, who in (("memory", "trainer (one cached-KD epoch)"), ("build_memory", "cache builder (one view)")):
            mem = r["train"][key]
            rows.append((f"{who}: peak RSS vs dataset size", "same" if key == "memory" else
                         "python benchmarks/bench_train.py --memory-only",
                         " / ".join(f"{m['peak_rss_mib']:.0f}" for m in mem) + " MiB at "
                         + " / ".join(f"{m['samples']:,}" for m in mem) + " samples"))
    if r.get("students"):
        st = r["students"]
        rows.append((f"student families: online ÷ cached KD step time, paired median (28 px, batch "
                     f"{st['settings']['batch_size']}, {st['settings']['threads']} thread; teachers regnety_002 + "
                     "rednet_small live)", st["settings"]["command"],
                     ", ".join(f"{a} ({v['params'] / 1e6:.2f} M) {v['cached_over_online_paired_median']:.2f}×"
                               for a, v in st["families"].items())))
    if r.get("cache"):
        c = r["cache"]
        rows.append(("cache build with its defaults (CPU: 1 render worker, 1 teacher thread) ÷ the teachers' in-memory inference (goal ≥ 0.95)", "python benchmarks/bench_cache.py",
                     f"{c['throughput']['ratio']:.3f} (CPU-time ratio {c['throughput']['cpu_ratio']:.2f})"))
        by = {}
        for b in c["bytes"]["results"]:
            by.setdefault((b["classes"], b["teacher"]), []).append(f"K={b['topk']}: {b['bytes_per_view_per_teacher']:.1f}")
        rows.append(("bytes per view per teacher (C = classes)", "same",
                     "; ".join(f"C={c}, {t}: " + ", ".join(v) for (c, t), v in by.items())))
        t = c["targets"]
        rows.append(("exact targets at C = 1000, K = 10: bytes at one τ, per extra τ; worst tail-mass error "
                     "(goals ≤ 30 B, ≤ 6 B, ≤ 1e-3)", "python benchmarks/bench_cache.py --part targets",
                     f"{t['bytes_one_temperature']:.1f} B, +{t['bytes_per_extra_temperature']:.1f} B per τ, "
                     f"{t['worst_tail_abs_error']:.1e}"))
    if r.get("models_cpu"):
        m = r["models_cpu"]["involution_vs_conv_twin"]
        rows.append(("involution net ÷ its 3×3-conv twin, CPU time per image (goal ≤ 2)",
                     "python benchmarks/bench_models.py --clock cpu",
                     f"forward {m['fwd_time_ratio']:.2f}×, fwd+bwd+step {m['fwd_bwd_step_time_ratio']:.2f}×"))
    if r.get("loader"):
        lo = r["loader"]
        rows.append(("Fashion-MNIST loader: read + decode + replay (28 px)", "python benchmarks/bench_loader.py",
                     f"{lo['breakdown']['images_per_cpu_second']:,.0f} images per CPU-second in one process; "
                     "DataLoader wall images/s per worker: " + ", ".join(
                         f"{d['workers']} workers {d['steady_images_per_s_per_worker']:,.0f}" for d in lo["dataloader"])))
    rows += users_wait_rows(r)
    if r.get("imagenet"):
        im = r["imagenet"]
        rows.append(("ImageNet-shaped synthetic run (JPEG, 224 px, 1000 classes)", "python benchmarks/bench_imagenet.py",
                     imagenet_summary(im)))
    lines = ["| what | command | result |", "| --- | --- | --- |"]
    lines += [f"| {a} | `{b}` | {c} |" if b != "same" else f"| {a} | same | {c} |" for a, b, c in rows]
    return lines


def minutes(seconds: float) -> str:
    whole = round(seconds)                    # 179.6 s is 3 min 00 s, not 2 min 60 s
    return f"{whole // 60} min {whole % 60:02d} s"


def adamw_note(step: dict) -> str:
    """The optimiser step the trainer uses (fused) beside torch's CPU default (a loop over the tensors)."""
    ms = step["adamw_step_ms"]
    return (f"; cit_nano's AdamW step {ms['fused']:.2f} ms fused (what `cit train` uses) vs {ms['for_loop']:.2f} ms "
            f"torch's per-tensor default, {ms['foreach']:.2f} ms foreach")


def users_wait_rows(r: dict) -> list[tuple[str, str, str]]:
    """Where a user waits: the training loader's join, the 224 px step, growing a cache, the demo."""
    rows = []
    if r.get("train_join"):
        j = r["train_join"]["join"]
        rows.append(("training loader with cached KD ÷ without, images per CPU-second, paired (goal ≥ 0.97); "
                     "step cached KD ÷ no KD, paired median (goal ≥ 0.99)", r["train_join"]["settings"]["command"],
                     ", ".join(f"loader {px} px {v['cached_over_none']:.3f}" for px, v in j["loader"].items())
                     + "; " + ", ".join(f"step {m} {v['step_cached_over_none']:.3f}" for m, v in j["step"].items())
                     + adamw_note(j["step"]["cit_nano"])))
    if r.get("train_paper224"):
        p = r["train_paper224"]["paper224"]
        cells = []
        for name, run in p["runs"].items():
            g = run["goal"]
            cells.append(f"{name}: cached ÷ online {g['cached_over_online']:.2f}× vs goal {g['0.95_x_none_over_online']:.2f}× "
                         f"(student-only ÷ online {run['none_over_online_paired_median']:.2f}×; FLOPs projection "
                         f"{run['flops']['projected_cached_over_online']:.2f}×)")
        rows.append((f"the paper's setting at 224 px: {p['student']} student, C = 1000, batch {p['batch_size']}, per-step "
                     "paired (goal: cached ÷ online ≥ 0.95 × student-only ÷ online)",
                     r["train_paper224"]["settings"]["command"], "; ".join(cells)))
    if r.get("grow"):
        g = r["grow"]
        rows.append(("growing a complete cache, time ÷ a fresh build of the same final cache (bit-identical results)",
                     g["settings"]["command"], f"extend E → 2E views {g['extend']['ratio_vs_fresh']:.2f}, add one "
                     f"teacher to one {g['add_teacher']['ratio_vs_fresh']:.2f} (the new work is half the final cache)"))
    if r.get("demo"):
        d = r["demo"]
        loads = ", ".join(f"{run['loadavg_start'][0]:.1f}" for run in d["runs"])
        rows.append(("`cit demo` from an empty folder, wall time (goal ≤ 4 min on 2 idle cores)",
                     d["settings"]["command"], ", ".join(minutes(w) for w in d["wall_seconds"])
                     + f" (load average at start {loads})"))
    if r.get("suite"):
        t = r["suite"]
        rows.append(("the test suite, wall time (goal ≤ 3 min on 2 idle cores)", "python benchmarks/bench_suite.py",
                     f"{minutes(t['wall_seconds'])} for {t['passed']} tests, {t['cpu_seconds']:.0f} CPU-seconds "
                     f"(load average at start {t['machine']['loadavg_start'][0]:.1f})"
                     + (": not met" if t["wall_seconds"] > 180 else "")))
    return rows


def imagenet_summary(im: dict) -> str:
    loader, proj = im["loader"], im["projection"]
    bpv = ", ".join(f"K={k}: {v:.1f}" for k, v in im["bytes_per_view"].items())
    storage = ", ".join(f"K={k}: {v['total_GB']:.0f} GB" for k, v in proj["storage_by_k"].items())
    return (f"loader {loader['images_per_cpu_second_per_core']:.0f} images per CPU-second per core; bytes/view/teacher "
            f"at C = 1000: {bpv}. Projection for ImageNet-1k × {proj['views']} views × {proj['teachers']} teachers: "
            f"storage {storage}; loader {proj['loader_core_hours_per_pass']:,.0f} core-hours per pass; teachers "
            f"{proj['teacher_gpu_hours_total']:.0f} GPU-hours at *assumed* GPU rates (see the JSON's `assumptions`)")


def teachers_line(data: dict) -> str:
    return "Teachers (test accuracy): " + ", ".join(
        f"`{n}` {t['arch']} ({t['kind']}) **{100 * t['test_acc']:.1f}%**" for n, t in data["teachers"].items()) + "."


def claims_section(c: dict) -> list[str]:
    s, st = c["summary"], c["settings"]
    lines = [f"Command: `{st['command']}`{load_note(c)}. Fashion-MNIST, {st['per_class']} training images per class, "
             f"test on {st['test_samples']:,} images; E = {st['views_E']} cached views = student epochs; "
             f"{st['seeds']} student seeds per row (mean ± sample std); the same views for every row.",
             "", teachers_line(c), "", "What reproduces: a claim counts as reproduced when the paired difference "
             "(same seed = same initial weights and views) is positive and larger than its seed-to-seed std — a weak "
             "test with three seeds (about a one-sided p < 0.1), so read the differences, not just the verdicts.", ""]
    lines += claims_verdicts(c)
    lines += ["", "| group | variant | config | class head % | mean of heads % |", "| --- | --- | --- | --- | --- |"]
    for name, v in s.items():
        extra = (" " + " ".join(f"`{x}`" for x in v["sets"])) if v["sets"] else ""
        lines.append(f"| {v['group']} | {v['label']} | `{v['config']}`{extra} | "
                     f"{pct(v['acc_cls_mean'], v['acc_cls_std'])} | "
                     f"{pct(v['acc_mean_heads_mean'], v['acc_mean_heads_std'])} |")
    lines += ["", "How to read the rows: every student has the same conv + involution stems (the `align` patch embedding) "
              "except `random tokens`, whose patch embedding is the plain linear projection with learned conv/inv "
              "tokens (an ablation of this project: the official code has only the aligned stems), so that row measures the stems and the tokens together. "
              "No KD and one-token students have only the class token. `online` runs the same teachers live on "
              "the same views; it differs from the cached run only by the fp16 rounding of the cached logits."]
    rob = c.get("robustness")
    if rob:
        lines += ["", "Robustness (Tables 5 and 9): accuracy on each test set, mean over seeds; KL(teacher ‖ token) "
                  "on the clean test set.", ""]
        lines += robustness_table(rob)
    lines += ["", "![claims](benchmarks/results/claims.png)"]
    return lines


# (claim, paper table, better variant, worse variant): each is checked on paired seeds (same seed = same initial
# weights and the same views in both runs)
CLAIMS = [
    ("KD from both teachers beats no KD", "4", "cit", "no_kd"),
    ("two teachers beat the conv teacher alone", "6", "cit", "conv"),
    ("two teachers beat the involution teacher alone", "6", "cit", "inv"),
    ("conv + involution beats conv + conv", "6", "cit", "conv_conv"),
    ("three tokens beat one token", "7", "cit", "one_token"),
    ("align tokens beat random tokens", "8", "cit", "random_tokens"),
    ("top-10 (all) beats top-5", "—", "cit", "k5"),
    ("top-5 beats top-1", "—", "k5", "k1"),
    ("top-5: the uniform tail beats renormalising", "—", "k5", "k5_renorm"),
    ("top-1: the uniform tail beats the hard label", "—", "k1", "k1_renorm"),
]


def paired_difference(runs: dict, better: str, worse: str) -> tuple[float, float, int] | None:
    """Mean and sample std over seeds of acc(better) − acc(worse), class head, seeds both variants ran."""
    a = {r["seed"]: r["acc_cls"] for r in runs.get(better, [])}
    b = {r["seed"]: r["acc_cls"] for r in runs.get(worse, [])}
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not diffs:
        return None
    m = sum(diffs) / len(diffs)
    sd = (sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else float("nan")
    return m, sd, len(diffs)


def verdict(mean: float, sd: float, n: int, paper: bool = True) -> str:
    """Reproduced (a paper claim) or holds (ours) when the mean difference exceeds the seed-to-seed std; reversed
    likewise in the other direction."""
    if n < 2:
        return "one seed: not decided"
    if abs(mean) > sd:
        return ("**reproduced**" if paper else "**holds**") if mean > 0 else "**reversed**"
    return "within seed noise"


def claims_verdicts(c: dict) -> list[str]:
    lines = ["| claim | paper table | difference (points, paired over seeds) | here |", "| --- | --- | --- | --- |"]
    for text, table, better, worse in CLAIMS:
        d = paired_difference(c["runs"], better, worse)
        if d is not None:
            m, sd, n = d
            lines.append(f"| {text} (`{better}` − `{worse}`) | {table} | {100 * m:+.2f} ± {100 * sd:.2f} (n={n}) | "
                         f"{verdict(m, sd, n, paper=table != '—')} |")
    online = paired_difference(c["runs"], "online", "cit")
    if online is not None:
        m, sd, n = online
        same = "identical" if m == 0 and (n == 1 or sd == 0) else \
            "agree within seed noise" if n > 1 and abs(m) <= sd else "one seed: not decided" if n == 1 else "**differ**"
        lines.append(f"| cached KD equals online KD on identical views (`online` − `cit`) | parity | "
                     f"{100 * m:+.2f} ± {100 * sd:.2f} (n={n}) | {same} |")
    return lines


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def robustness_rows(rob: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(set names, {column: {set: accuracy}}): the teachers, and each variant's heads averaged over its seeds."""
    sets = list(rob["sets"])
    cols: dict[str, dict[str, float]] = {}
    for name in sets:
        r = rob["sets"][name]
        for t, acc in r["teachers"].items():
            cols.setdefault(f"teacher {t}", {})[name] = acc
        for variant, labels in _by_variant(r["students"]).items():
            heads = list(r["students"][labels[0]]["acc"])
            for head in heads if len(heads) > 2 else ["cls"]:      # a one-head student: its mean is its cls
                cols.setdefault(f"{variant} {head}", {})[name] = _mean([r["students"][x]["acc"][head] for x in labels])
    return sets, cols


def _by_variant(students: dict) -> dict[str, list[str]]:
    """{"cit": ["cit/s0", "cit/s1", ...], ...}"""
    out: dict[str, list[str]] = {}
    for label in students:
        out.setdefault(label.split("/")[0], []).append(label)
    return out


def token_findings(rob: dict, variant: str = "cit") -> list[str]:
    """Do the student's conv and inv tokens inherit their teachers' differences?  (teachers listed conv, inv)"""
    sets, cols = robustness_rows(rob)
    conv_t, inv_t = list(rob["sets"][sets[0]]["teachers"])
    if f"{variant} conv" not in cols:
        return []
    corrupt = [x for x in sets if x.startswith("corrupt/")]
    same = [x for x in corrupt if (cols[f"{variant} conv"][x] - cols[f"{variant} inv"][x]) *
            (cols[f"teacher {conv_t}"][x] - cols[f"teacher {inv_t}"][x]) > 0]
    clean = rob["sets"][sets[0]]["students"]
    labels = _by_variant(clean)[variant]
    kl = {(h, t): _mean([clean[x]["kl"][h][t] for x in labels]) for h in ("conv", "inv") for t in (conv_t, inv_t)}
    yes = {True: "yes", False: "no"}
    return [f"- On {len(same)} of {len(corrupt)} corrupted sets the `{variant}` student's conv and inv tokens are "
            f"ordered like their teachers ({', '.join(x.replace('corrupt/', '') for x in same) or 'none'}).",
            f"- The conv token is closer to the conv teacher than the inv token is: {yes[kl['conv', conv_t] < kl['inv', conv_t]]} "
            f"(KL {kl['conv', conv_t]:.3f} vs {kl['inv', conv_t]:.3f}); the inv token is closer to the inv teacher "
            f"than the conv token is: {yes[kl['inv', inv_t] < kl['conv', inv_t]]} "
            f"(KL {kl['inv', inv_t]:.3f} vs {kl['conv', inv_t]:.3f})."]


def robustness_table(rob: dict) -> list[str]:
    sets, cols = robustness_rows(rob)
    lines = ["| model / head | " + " | ".join(x.replace("corrupt/", "") for x in sets) + " |",
             "| --- |" + " --- |" * len(sets)]
    for label, accs in cols.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * accs[x]:.1f}" for x in sets) + " |")
    clean = rob["sets"][sets[0]]
    teachers = list(clean["teachers"])
    lines += ["", f"KL(teacher ‖ token) on `{sets[0]}`, mean over seeds:", "",
              "| student, token | " + " | ".join(f"KL to {t}" for t in teachers) + " |",
              "| --- |" + " --- |" * len(teachers)]
    for variant, labels in _by_variant(clean["students"]).items():
        for head in clean["students"][labels[0]]["kl"]:
            vals = [_mean([clean["students"][x]["kl"][head][t] for x in labels]) for t in teachers]
            lines.append(f"| {variant}, {head} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return lines + [""] + token_findings(rob)


def mixing_section(m: dict) -> list[str]:
    st, s, cost = m["settings"], m["summary"], m["exact_cache_cost"]
    labels = {"exact_cached": "`exact`: cached teachers saw the mixed image",
              "approx_cached": "`approx`: cached unmixed, distributions mixed linearly",
              "exact_online": "online teachers on the same mixed views"}
    lines = [f"Command: `{st['command']}`{load_note(m)}. Fashion-MNIST, {st['per_class']} images per class, "
             f"E = {st['views_E']} views = epochs, {st['seeds']} seeds, mixup 0.8 / cutmix 1.0, test on "
             f"{st['test_samples']:,} images. `exact` and online train on the very same mixed images; `approx` "
             "mixes the same unmixed views with its own batch-level pairing and λ.", "", teachers_line(m),
             "", "| mode | class head % | mean of heads % |", "| --- | --- | --- |"]
    for k, v in s.items():
        lines.append(f"| {labels.get(k, k)} | {pct(v['acc_cls_mean'], v['acc_cls_std'])} | "
                     f"{pct(v['acc_mean_heads_mean'], v['acc_mean_heads_std'])} |")
    lines += ["", "Paired over seeds (same seed = same initial weights and views), class head:", ""]
    for better, worse, text in (("exact_cached", "approx_cached", "`exact` − `approx`"),
                                ("exact_online", "exact_cached", "online − `exact` cached")):
        d = paired_difference(m["runs"], better, worse)
        if d is not None:
            lines.append(f"- {text}: {100 * d[0]:+.2f} ± {100 * d[1]:.2f} points (n={d[2]})")
    lines += ["", f"The `exact` cache took {cost['build_time_ratio']:.2f}× the unmixed build time (same E, same "
              f"teachers, one run each on a shared machine) and {cost['bytes_ratio']:.2f}× its bytes."]
    return lines


def lowdata_intro(d: dict) -> str:
    st = d["settings"]
    collected = (" (it collected the runs that `--part 0/2` and `--part 1/2` had trained side by side, one thread "
                 "each, at nice 10 on a machine shared with other jobs)") if "--collect" in st["command"] else ""
    return (f"Command: `{st['command']}`{load_note(d)}{collected}. Fashion-MNIST, {st['per_class']} training images per class, "
            f"test on {st['test_samples']:,} images; E = {st['views_E']} cached views = student epochs (teachers "
            f"{st['teacher_epochs']} epochs), batch {st['batch_size']}; up to {st['seeds']} seeds per row (n = the "
            "row's finished runs; mean ± sample std), paired: the same seed has the same views and batch order in "
            "every row. A difference counts when the paired mean exceeds its seed-to-seed std; otherwise it is "
            "reported as within the seed spread.")


def schedule_note(d: dict) -> str:
    """How far the short schedule leaves the students from their teachers (read the rows as early training)."""
    best = max(v["acc_cls_mean"] for v in d["summary"].values())
    worst_teacher = min(t["test_acc"] for t in d["teachers"].values())
    if best >= worst_teacher - 0.05:
        return ""
    return (f" The best row reaches {100 * best:.1f}%, the weaker teacher {100 * worst_teacher:.1f}%: after "
            f"{d['settings']['views_E']} epochs the students are far from converged, so these rows compare how "
            "much each student learns from the teachers early in training, not where it ends.")


def families_section(f: dict) -> list[str]:
    s, fams, rows = f["summary"], f["families"], f["teacher_rows"]
    lines = [lowdata_intro(f) + schedule_note(f), "", teachers_line(f), "",
             "Students (parameters at 28 px, 10 classes, three heads):", ""]
    for name, fam in fams.items():
        scaled = f" — {fam['scaled']}" if fam["scaled"] else ""
        lines.append(f"- {fam['label']}: `{fam['arch']}` {fam['options'] or ''} **{fam['params']['heads_3']:,}**"
                     f"{scaled}")
    families = [n for n in fams if any(k.startswith(n + "-") for k in s)]
    lines += ["", "Top-1 of the class head, % (mean of heads in brackets):", "",
              "| student | " + " | ".join(rows.values()) + " | gain of conv + inv over no KD | over the better single "
              "teacher |", "| --- |" + " --- |" * (len(rows) + 2)]
    for n in families:
        cells = []
        for key in rows:
            v = s.get(f"{n}-{key}")
            cells.append(f"{pct(v['acc_cls_mean'], v['acc_cls_std'])} ({100 * v['acc_mean_heads_mean']:.2f}), "
                         f"n={v['seeds']}" if v else "not run")
        g = f["findings"]["gains"][n]
        cells += [f"{100 * x['mean']:+.2f} ± {100 * (x['std'] or 0):.2f} (n={x['n']})" if x else "—"
                  for x in (g["over_no_kd"], g["over_best_single"])]
        lines.append(f"| {fams[n]['label']} | " + " | ".join(cells) + " |")
    teachers = list(f["teachers"])
    lines += ["", f"KL(teacher ‖ student), τ = 1, the student's prediction (mean of heads), on the first "
              f"{f['settings']['kl_test_samples']:,} test images, mean ± std over seeds:", "", "| student | " + " | ".join(
                  f"{rows[k]}: KL to {t}" for k in rows for t in teachers) + " |",
              "| --- |" + " --- |" * (len(rows) * len(teachers))]
    for n in families:
        cells = []
        for key in rows:
            kl = f["kl"].get(f"{n}-{key}", {}).get("mean")
            cells += [f"{kl[t]['mean']:.3f} ± {kl[t]['std']:.3f}" if kl else "—" for t in teachers]
        lines.append(f"| {fams[n]['label']} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's findings, paired over seeds (points of top-1 / nats of KL):", ""]
    for key, d in f["findings"]["transformer_gains_most"].items():
        other, kind = key.removeprefix("vit_minus_").split("_", 1)
        what = "over no KD" if kind == "over_no_kd" else "over the better single teacher"
        lines.append(f"- The transformer gains more from two teachers ({what}) than the {fams[other]['label']}: "
                     + (f"{100 * d['mean']:+.2f} ± {100 * (d['std'] or 0):.2f} (n={d['n']}), {d['verdict']}."
                        if d.get("n") else "not run."))
    for key, d in f["findings"]["mixer_farthest"].items():
        other, teacher = key.removeprefix("mixer_minus_").split("_kl_")
        lines.append(f"- The two-teacher Mixer is farther from `{teacher}` than the {fams[other]['label']} is: "
                     + (f"KL {d['mean']:+.3f} ± {d['std'] or 0:.3f} (n={d['n']}), {d['verdict']}."
                        if d.get("n") else "not run."))
    return lines + ["", "![families](benchmarks/results/families.png)"]


def recipes_section(r: dict) -> list[str]:
    lines = [lowdata_intro(r) + " The cache stores the targets exactly at τ = "
             + ", ".join(f"{t:g}" for t in r["cache"]["temperatures"]) + "." + schedule_note(r), "",
             teachers_line(r), "",
             "| group | variant | overrides | n | class head % | mean of heads % |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, v in r["summary"].items():
        sets = " ".join(f"`{x}`" for x in v["sets"])
        lines.append(f"| {v['group']} | {v['label']} | `{v['config']}` {sets} | {v['seeds']} | "
                     f"{pct(v['acc_cls_mean'], v['acc_cls_std'])} | "
                     f"{pct(v['acc_mean_heads_mean'], v['acc_mean_heads_std'])} |")
    lines += ["", "| question (class head, paired over seeds) | difference, points | here |", "| --- | --- | --- |"]
    for c in r["comparisons"]:
        lines.append(f"| {c['question']} (`{c['better']}` − `{c['worse']}`) | {100 * c['mean']:+.2f} ± "
                     f"{100 * (c['std'] or 0):.2f} (n={c['n']}) | {c['verdict']} |")
    return lines


# ------------------------------------------------------------------------------------------------------ plots

def plot_families(f: dict, path: str) -> None:
    """Top-1 per family × teachers (left) and KL to each teacher (right), mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s, rows, fams = f["summary"], f["teacher_rows"], f["families"]
    families = [n for n in fams if any(k.startswith(n + "-") for k in s)]
    teachers = list(f["teachers"])
    fig, axes = plt.subplots(1, 1 + len(teachers), figsize=(15, 4.8))
    width = 0.8 / len(rows)
    for i, key in enumerate(rows):
        xs = [j + i * width for j in range(len(families))]
        vals = [s.get(f"{n}-{key}") for n in families]
        axes[0].bar(xs, [100 * v["acc_cls_mean"] if v else 0 for v in vals], width,
                    yerr=[100 * v["acc_cls_std"] if v else 0 for v in vals], capsize=3, label=rows[key])
        for ax, t in zip(axes[1:], teachers):
            kl = [f["kl"].get(f"{n}-{key}", {}).get("mean", {}).get(t) for n in families]
            ax.bar(xs, [k["mean"] if k else 0 for k in kl], width, yerr=[k["std"] if k else 0 for k in kl],
                   capsize=3, label=rows[key])
    ticks = [j + 0.4 - width / 2 for j in range(len(families))]
    for t, info in f["teachers"].items():
        axes[0].axhline(100 * info["test_acc"], ls="--", lw=1, color="gray")
    means = [100 * v["acc_cls_mean"] for v in s.values()]
    axes[0].set_ylim(max(0, min(means) - 8), max(means + [100 * t["test_acc"] for t in f["teachers"].values()]) + 3)
    axes[0].set_ylabel("test top-1, class head (%)")
    axes[0].set_title(f"Top-1, mean ± std over {f['settings']['seeds']} seeds (dashed: teachers)")
    for ax, t in zip(axes[1:], teachers):
        ax.set_ylabel("KL(teacher ‖ student), nats")
        ax.set_title(f"KL to {t} ({f['teachers'][t]['kind']} teacher)")
    for ax in axes:
        ax.set_xticks(ticks, [fams[n]["label"] for n in families], rotation=15)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_claims(c: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = c["summary"]
    fig, axes = plt.subplots(1, 2 if c.get("robustness") else 1, figsize=(13, 5.5), squeeze=False)
    ax = axes[0][0]
    names = list(s)
    means = [100 * s[n]["acc_cls_mean"] for n in names]
    stds = [100 * s[n]["acc_cls_std"] for n in names]
    groups = sorted({s[n]["group"] for n in names}, key=[s[n]["group"] for n in names].index)
    colors = {g: plt.cm.tab10(i) for i, g in enumerate(groups)}
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[colors[s[n]["group"]] for n in names])
    for name, t in c["teachers"].items():
        ax.axhline(100 * t["test_acc"], ls="--", lw=1, color="gray")
        ax.text(len(names) - 0.5, 100 * t["test_acc"], f" {name}", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    lo = min(m - e for m, e in zip(means, stds))
    ax.set_ylim(max(0, lo - 5), max(max(means), *(100 * t["test_acc"] for t in c["teachers"].values())) + 3)
    ax.set_ylabel("test accuracy, class head (%)")
    ax.set_title(f"Students, mean ± std over {c['settings']['seeds']} seeds (dashed: teachers)")
    if c.get("robustness"):
        ax = axes[0][1]
        sets, cols = robustness_rows(c["robustness"])
        width = 0.8 / len(cols)
        for i, (label, accs) in enumerate(cols.items()):
            ax.bar([j + i * width for j in range(len(sets))], [100 * accs[x] for x in sets], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], [x.replace("corrupt/", "") for x in sets],
                      rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Clean and corrupted test sets (severity 3)")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- README

def render(results: dict) -> str:
    lines = [RESULTS_START, "", "Generated by `python benchmarks/render.py` from `benchmarks/results/*.json`; each "
             "table names the command that wrote its JSON. Machine: 2 CPU cores, no GPU; other jobs often shared "
             "the cores, so absolute rates are pessimistic — the paired ratios are the robust numbers.", "",
             "### Speed and size", ""]
    lines += speed_section(results)
    if results.get("claims"):
        lines += ["", "### The paper's claims at small scale", ""] + claims_section(results["claims"])
    if results.get("mixing"):
        lines += ["", "### Mixup / CutMix with cached teachers", ""] + mixing_section(results["mixing"])
    if results.get("families"):
        lines += ["", "### Student families and teachers (paper Tables 4 and 5 at small scale)", ""] + \
            families_section(results["families"])
    if results.get("recipes"):
        lines += ["", "### Distillation recipes for the CiT student", ""] + recipes_section(results["recipes"])
    lines += ["", RESULTS_END]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's section differs from a fresh render")
    ap.add_argument("--results", default=RESULTS, help="folder of result JSONs (plots are written there too)")
    ap.add_argument("--readme", default=README)
    args = ap.parse_args()
    results = {name: load(name, args.results) for name in FIELDS}
    for name, data in results.items():
        if data is not None and (missing := missing_fields(name, data)):
            print(f"{os.path.join(args.results, name)}.json lacks: {'; '.join(missing)}", file=sys.stderr)
            return 2
    section = render(results)
    with open(args.readme) as f:
        readme = f.read()
    if RESULTS_START not in readme or RESULTS_END not in readme:
        print(f"README.md has no {RESULTS_START} ... {RESULTS_END} section", file=sys.stderr)
        return 2
    head, rest = readme.split(RESULTS_START, 1)
    tail = rest.split(RESULTS_END, 1)[1]
    new = head + section + tail
    if args.check:
        return int(new != readme)
    from shared.io import atomic_write_text
    atomic_write_text(args.readme, new)
    if results.get("claims"):
        plot_claims(results["claims"], os.path.join(args.results, "claims.png"))
    if results.get("families"):
        plot_families(results["families"], os.path.join(args.results, "families.png"))
    print(f"{args.readme}: results section rewritten ({len(section.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
