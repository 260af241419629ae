"""``cit eval``: accuracy of a saved model on test sets (and their corrupted copies), both inference outputs.

A student is reported twice, as the design asks: ``cls`` = the class head alone (the paper's text) and ``mean`` =
the mean of its heads' logits (the official code's evaluation).  A teacher has one output, ``cls``.  Each set is
read once; the deterministic evaluation view is rebuilt with the spec the model was trained with.
"""
from __future__ import annotations

import glob
import os
from collections import defaultdict

import torch

from shared.augment import ViewSpec, to_model_input
from shared.manifest import Manifest
from trainer.data import EvalViews, make_loader
from trainer.engine import evaluate, setup_runtime, write_json
from trainer.losses import kd_kl
from trainer.train import eval_outputs, model_outputs


def _get(meta, name: str, default=None):
    """A field of a checkpoint's meta (``ModelMeta`` and plain dicts both have ``get``)."""
    return meta.get(name, default)


def eval_spec(meta) -> ViewSpec:
    """The spec of the evaluation view: the training spec if recorded, else the image size the model was built for."""
    augment = _get(meta, "augment")
    if augment:
        return ViewSpec.from_dict(augment)
    size = (_get(meta, "model_kwargs") or {}).get("img_size") or 28
    return ViewSpec(image_size=int(size), interpolation=_get(meta, "interpolation") or "bilinear")


def expand_sets(data: list[str], corrupt_dir: str | None = None) -> dict[str, str]:
    """Name -> manifest path, for the given manifests and every manifest under ``corrupt_dir``."""
    sets = {os.path.splitext(os.path.basename(p))[0]: p for p in data}
    if corrupt_dir:
        for path in sorted(glob.glob(os.path.join(corrupt_dir, "*.json"))):
            sets["corrupt/" + os.path.splitext(os.path.basename(path))[0]] = path
    return sets


def load_sets(data: list[str], corrupt_dir: str | None, num_classes, in_chans=None) -> dict[str, Manifest]:
    """Name -> manifest of every set to evaluate; refuses none at all and any set of another class or channel
    count."""
    sets = expand_sets(data, corrupt_dir)
    if not sets:
        raise ValueError("nothing to evaluate: pass --data MANIFEST (and/or --corrupt-dir)")
    manifests = {name: Manifest.load(path) for name, path in sets.items()}
    for name, manifest in manifests.items():
        if num_classes is not None and manifest.num_classes != int(num_classes):
            raise ValueError(f"{sets[name]} has {manifest.num_classes} classes, the model {num_classes}")
        if in_chans is not None and manifest.require_channels() != int(in_chans):
            raise ValueError(f"{sets[name]} has {manifest.channels}-channel images, the model takes {in_chans}")
    return manifests


def model_norm(meta, spec: ViewSpec) -> tuple[tuple, tuple]:
    """The (mean, std) a model was trained with (its own, else the spec's)."""
    return tuple(_get(meta, "mean") or spec.mean), tuple(_get(meta, "std") or spec.std)


def evaluate_checkpoint(checkpoint_path: str, data: list[str], *, corrupt_dir: str | None = None,
                        batch_size: int = 256, num_workers: int = 2, device: str = "auto",
                        out: str | None = None) -> dict:
    """{"checkpoint", "outputs", "sets": {name: {"acc_cls", ["acc_mean"], "samples"}}}; written to ``out`` if set."""
    from shared import checkpoint
    runtime = setup_runtime(device)
    model, meta = checkpoint.load_checkpoint(checkpoint_path)
    manifests = load_sets(data, corrupt_dir, _get(meta, "num_classes"), _get(meta, "in_chans"))
    model = model.to(runtime.device).eval()
    spec = eval_spec(meta)
    mean, std = model_norm(meta, spec)
    results = {}
    for name, manifest in manifests.items():
        loader = make_loader(EvalViews(manifest, spec, runtime.rank, runtime.world), batch_size, num_workers,
                             pin_memory=runtime.device.type == "cuda")
        results[name] = evaluate(lambda views: eval_outputs(model, to_model_input(views, mean, std)), loader, runtime)
    report = {"checkpoint": checkpoint_path, "arch": _get(meta, "arch"), "kind": _get(meta, "kind"),
              "outputs": {"cls": "class head", "mean": "mean of the heads' logits (official CiT evaluation)"},
              "sets": results}
    if out and runtime.main:
        write_json(out, report)
    return report


@torch.no_grad()
def evaluate_agreement(students: dict[str, str], teachers: dict[str, str], data: list[str], *,
                       corrupt_dir: str | None = None, batch_size: int = 256, num_workers: int = 2,
                       device: str = "auto", out: str | None = None) -> dict:
    """Each head of each student against each teacher on the same evaluation views (paper Tables 5 and 9).

    Per set: every teacher's accuracy, and per student the accuracy of each head and of the mean of heads, and
    ``kl[head][teacher]`` = mean KL(σ(teacher) ‖ σ(head)) at τ = 1: how closely each token follows each teacher.
    Teachers run once per batch for all students.  Single process."""
    from shared import checkpoint
    from shared.models.normalize import teacher_input
    runtime = setup_runtime(device)
    models, metas = {}, {}
    for label, path in students.items():
        models[label], metas[label] = checkpoint.load_checkpoint(path)
        if not hasattr(models[label], "forward_heads"):
            raise ValueError(f"{path} is not a student with heads ({_get(metas[label], 'arch')}); "
                             "comparing with teachers needs a CiT student checkpoint")
    classes = _get(next(iter(metas.values())), "num_classes")
    manifests = load_sets(data, corrupt_dir, classes, _get(next(iter(metas.values())), "in_chans"))
    for name, path in teachers.items():
        models[name], metas[name] = checkpoint.load_checkpoint(path, expect_classes=classes)
    for model in models.values():
        model.to(runtime.device).eval()
    spec = eval_spec(next(iter(metas.values())))
    norm = {n: model_norm(m, spec) for n, m in metas.items()}
    zero = lambda: torch.zeros((), device=runtime.device)  # noqa: E731
    results = {}
    for set_name, manifest in manifests.items():
        loader = make_loader(EvalViews(manifest, spec, 0, 1), batch_size, num_workers,
                             pin_memory=runtime.device.type == "cuda")
        hits: dict[tuple[str | None, str], torch.Tensor] = defaultdict(zero)
        kl: dict[tuple[str, str, str], torch.Tensor] = defaultdict(zero)
        heads_of: dict[str, list[str]] = {}
        total = 0
        for batch in loader:
            batch = batch.to(runtime.device)
            logits = {n: models[n](teacher_input(batch.views, *norm[n], *metas[n].resize_for(spec.image_size)))
                      for n in teachers}
            for n, z in logits.items():
                hits[None, n] += (z.argmax(1) == batch.labels).sum()
            for label in students:
                heads = model_outputs(models[label].forward_heads(to_model_input(batch.views, *norm[label])))
                heads["mean"] = torch.stack(list(heads.values())).mean(0)
                heads_of[label] = list(heads)
                for head, z in heads.items():
                    hits[label, head] += (z.argmax(1) == batch.labels).sum()
                    for n, t in logits.items():
                        kl[label, head, n] += kd_kl(z, t, 1.0) * len(batch)
            total += len(batch)
        count = max(total, 1)
        results[set_name] = {
            "samples": total, "teachers": {n: hits[None, n].item() / count for n in teachers},
            "students": {label: {"acc": {h: hits[label, h].item() / count for h in heads},
                                 "kl": {h: {n: kl[label, h, n].item() / count for n in teachers} for h in heads}}
                         for label, heads in heads_of.items()}}
    report = {"students": students, "teachers": teachers, "kl": "mean KL(teacher || head), tau = 1", "sets": results}
    if out:
        write_json(out, report)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['checkpoint']} ({report.get('arch')}, {report.get('kind')})"]
    for name, r in report["sets"].items():
        accs = "  ".join(f"{k[4:]}={v * 100:.2f}%" for k, v in r.items() if k.startswith("acc_"))
        lines.append(f"  {name:<24} {accs}  (n={r['samples']})")
    return "\n".join(lines)


def format_agreement(report: dict) -> str:
    lines = [f"students vs teachers {', '.join(report['teachers'])} ({report['kl']})"]
    for name, r in report["sets"].items():
        lines.append(f"  {name} (n={r['samples']}): " + "  ".join(f"{t}={a * 100:.2f}%" for t, a in r["teachers"].items()))
        for label, st in r["students"].items():
            lines.append(f"    {label}: " + "  ".join(f"{h}={a * 100:.2f}%" for h, a in st["acc"].items()))
            for head, row in st["kl"].items():
                lines.append(f"      KL to {head:<5} " + "  ".join(f"{t}={v:.4f}" for t, v in row.items()))
    return "\n".join(lines)
