"""``cit cache info --fidelity``: how much of each teacher's distribution the cache keeps, and how far the cached
target is from the live teacher.

Per teacher, on M random cached views: the distribution of the top-1 probability, the top-k coverage (mass of the
K stored classes) and the tail mass at every cached temperature — a confident teacher keeps most of its mass in
the top-k, a flat one does not and its target leans on the uniform tail.  With the teacher's checkpoint (and the
manifest, to re-render the views with the builder's own functions), KL(live teacher ‖ cached target) at each
cached τ on the same views: 0 up to fp16 rounding where the tail really is flat, the cost of the uniform tail
otherwise.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.augment import ViewSpec
from shared.cache_schema import CacheError, LogitCache
from shared.io import atomic_write_bytes

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
QUANTILE_NAMES = ("min", "p5", "p25", "p50", "p75", "p95", "max")


@dataclass
class FidelityOptions:
    """What ``cache_fidelity`` samples and compares."""
    sample: int = 1000                          # M random (view, row) pairs among the written units
    teachers: dict = field(default_factory=dict)  # name -> checkpoint: compute KL(live ‖ cached) for these
    data: str | None = None                     # manifest to re-render the views from (needed with ``teachers``)
    device: str = "auto"
    seed: int = 0
    batch_size: int = 64
    storage_options: dict | None = None


def _summary(values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64)
    out = dict(zip(QUANTILE_NAMES, (float(q) for q in np.quantile(values, QUANTILES))))
    out["mean"] = float(values.mean())
    return out


def sample_rows(cache: LogitCache, m: int, seed: int) -> list[tuple[int, int]]:
    """Up to ``m`` distinct random (view, row) pairs of the written units (``verify``'s picker: no list of every
    row, which at ImageNet scale would not fit), sorted by (view, row)."""
    from cache_builder.verify import pick_views
    picks = pick_views(cache.attrs, cache.done_map(), m, seed)
    if not picks:
        raise CacheError(f"cache {cache.url}: no written units to sample")
    return sorted(picks)


def read_rows(cache: LogitCache, teacher: str, picks: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """logp (M, K), indices (M, K), tail (M, S) of the picked rows, one block read per (view, chunk) touched."""
    attrs = cache.attrs
    by_unit: dict[tuple[int, int], list[int]] = {}
    for i, (v, row) in enumerate(picks):
        by_unit.setdefault((v, row // attrs.chunk_rows), []).append(i)
    logp = np.empty((len(picks), attrs.topk), np.float32)
    indices = np.empty((len(picks), attrs.topk), np.int64)
    tail = np.empty((len(picks), len(attrs.temperatures)), np.float32)
    for (v, chunk), positions in by_unit.items():
        lo, hi = attrs.chunk_rows_range(chunk)
        block = cache.read_topk(teacher, v, lo, hi)
        offsets = [picks[i][1] - lo for i in positions]
        logp[positions] = block.logp[offsets]
        indices[positions] = block.indices[offsets]
        tail[positions] = block.tail[offsets]
    return logp, indices, tail


def cache_fidelity(url: str, options: FidelityOptions | None = None) -> dict:
    """A JSON-able report (see the module doc)."""
    options = options or FidelityOptions()
    if options.sample < 1:
        raise CacheError(f"--sample must be >= 1, got {options.sample}")
    if options.teachers and not options.data:
        raise CacheError("--fidelity with --teacher needs --data MANIFEST (the views are re-rendered from it)")
    cache = LogitCache.open(url, storage_options=options.storage_options)
    attrs = cache.attrs
    unknown = sorted(set(options.teachers) - set(cache.teacher_names))
    if unknown:
        raise CacheError(f"--teacher {unknown[0]}: not in cache {url} (it has {cache.teacher_names})")
    picks = sample_rows(cache, options.sample, options.seed)
    taus = [float(t) for t in attrs.temperatures]
    report = {"url": url, "views_sampled": len(picks), "seed": options.seed, "num_classes": attrs.num_classes,
              "topk": attrs.topk, "temperatures": taus, "teachers": {}}
    stored = {}
    for record in attrs.teachers:
        logp, indices, tail = stored[record.name] = read_rows(cache, record.name, picks)
        tail_mass = np.exp(tail.astype(np.float64))
        report["teachers"][record.name] = {
            "top1_probability": _summary(np.exp(logp[:, 0].astype(np.float64))),
            "topk_coverage": {f"{t:g}": _summary(1.0 - tail_mass[:, s]) for s, t in enumerate(taus)},
            "tail_mass": {f"{t:g}": _summary(tail_mass[:, s]) for s, t in enumerate(taus)}}
    if options.teachers:
        kls = live_kl(cache, options, picks, stored)
        for name, per_tau in kls.items():
            report["teachers"][name]["kl_live_vs_cached"] = {f"{t:g}": _summary(v) for t, v in per_tau.items()}
            report["teachers"][name]["checkpoint"] = options.teachers[name]
    report["_raw"] = {name: {"top1": np.exp(s[0][:, 0].astype(np.float64)), "tail": np.exp(s[2].astype(np.float64))}
                      for name, s in stored.items()}
    return report


def live_kl(cache: LogitCache, options: FidelityOptions, picks: list[tuple[int, int]], stored: dict
            ) -> dict[str, dict[float, np.ndarray]]:
    """KL(softmax(z/τ) ‖ cached target at τ) per row, for each teacher given a checkpoint, at each cached τ.
    The views are re-rendered with the builder's ``render_rows`` and run with its ``TeacherRunner``."""
    from cache_builder.errors import BuildError
    from cache_builder.streams import ReplayedViews
    from cache_builder.teachers import TeacherRunner, load_recorded_teachers, resolve_device
    from shared.manifest import Manifest, ManifestError
    from shared.targets import target_log_probs
    attrs = cache.attrs
    try:
        manifest = Manifest.load(options.data)
    except ManifestError as exc:
        raise CacheError(f"--data: {exc}") from None
    if manifest.fingerprint != attrs.dataset_fingerprint:
        raise CacheError(f"--data {options.data} is not the dataset cache {cache.url} was built from (fingerprint "
                         f"{manifest.fingerprint[:12]}… != {attrs.dataset_fingerprint[:12]}…)")
    device = resolve_device(options.device)
    try:
        loaded = load_recorded_teachers(attrs, list(options.teachers.items()), device)
    except BuildError as exc:
        raise CacheError(str(exc)) from None
    precision = attrs.build.get("precision", "fp32")
    runner = TeacherRunner(loaded, device, "fp32" if device.type != "cuda" else precision, attrs.topk,
                           tuple(attrs.temperatures))
    replay = ReplayedViews(manifest, ViewSpec.from_dict(attrs.augment), attrs.seed, picks)
    taus = [float(t) for t in attrs.temperatures]
    out = {t.name: {tau: [] for tau in taus} for t in loaded}
    for a in range(0, len(picks), options.batch_size):
        batch = picks[a:a + options.batch_size]
        views = torch.stack([replay.render(v, row)[0] for v, row in batch]).to(device)
        with torch.inference_mode():
            for t in loaded:
                logits = runner.logits(t, views).double()
                logp, indices, tail = (torch.from_numpy(x[a:a + len(batch)]).to(device) for x in stored[t.name])
                for s, tau in enumerate(taus):
                    live = torch.log_softmax(logits / tau, dim=1)
                    cached = target_log_probs(logp, indices, tail[:, s], tau, attrs.num_classes).double()
                    out[t.name][tau].append((live.exp() * (live - cached)).sum(1).cpu().numpy())
    return {name: {tau: np.concatenate(parts) for tau, parts in per.items()} for name, per in out.items()}


def format_fidelity(report: dict) -> str:
    head = "".join(f"{q:>9}" for q in (*QUANTILE_NAMES, "mean"))
    lines = [f"fidelity of cache {report['url']}: {report['views_sampled']} random views (seed {report['seed']}); "
             f"C={report['num_classes']}, K={report['topk']}, cached τ: "
             + ", ".join(f"{t:g}" for t in report["temperatures"])]
    for name, t in report["teachers"].items():
        lines += [f"teacher {name}", f"  {'':<26}{head}"]
        rows = [("top-1 probability (τ=1)", t["top1_probability"])]
        rows += [(f"top-k coverage τ={tau}", s) for tau, s in t["topk_coverage"].items()]
        rows += [(f"tail mass τ={tau}", s) for tau, s in t["tail_mass"].items()]
        rows += [(f"KL(live ‖ cached) τ={tau}", s) for tau, s in t.get("kl_live_vs_cached", {}).items()]
        for label, s in rows:
            lines.append(f"  {label:<26}" + "".join(f"{s[q]:>9.4g}" for q in (*QUANTILE_NAMES, "mean")))
    return "\n".join(lines)


def fidelity_png(report: dict, path: str) -> None:
    """Histograms per teacher: top-1 probability, top-k coverage and tail mass (log scale) at each cached τ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    raw = report["_raw"]
    fig, axes = plt.subplots(len(raw), 3, figsize=(14, 3.2 * len(raw)), squeeze=False)
    for row, (name, data) in enumerate(raw.items()):
        axes[row, 0].hist(data["top1"], bins=40, range=(0, 1), color="#4477aa")
        axes[row, 0].set(title=f"{name}: top-1 probability", xlabel="p", ylabel="views")
        tails = np.clip(data["tail"], 1e-12, 1.0)
        bins = np.logspace(np.log10(tails.min()), 0, 40) if tails.min() < 1 else 10
        for s, tau in enumerate(report["temperatures"]):
            axes[row, 1].hist(1.0 - data["tail"][:, s], bins=40, range=(0, 1), histtype="step", label=f"τ={tau:g}")
            axes[row, 2].hist(tails[:, s], bins=bins, histtype="step", label=f"τ={tau:g}")
        axes[row, 1].set(title=f"{name}: top-{report['topk']} coverage", xlabel="mass", ylabel="views")
        axes[row, 2].set(xscale="log", title=f"{name}: tail mass outside the top-{report['topk']}",
                         xlabel="mass", ylabel="views")
        axes[row, 1].legend()
        axes[row, 2].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def public(report: dict) -> dict:
    """The report without the raw per-view arrays (for JSON)."""
    return {k: v for k, v in report.items() if k != "_raw"}
