"""``cit eval``: accuracy of a saved model on test sets (and their corrupted copies), both inference outputs.

A student is reported twice, as the design asks: ``cls`` = the class head alone (the paper's text) and ``mean`` =
the mean of its heads' logits (the official code's evaluation).  A teacher has one output, ``cls``.  Each set is
read once; the deterministic evaluation view is rebuilt with the spec the model was trained with.
"""
from __future__ import annotations

import glob
import os

from shared.augment import ViewSpec, to_model_input
from shared.manifest import Manifest
from trainer.data import EvalViews, make_loader
from trainer.engine import evaluate, setup_runtime, write_json
from trainer.train import eval_outputs


def _get(meta, name: str, default=None):
    """A field of a checkpoint's meta (``ModelMeta`` and plain dicts both have ``get``)."""
    return meta.get(name, default)


def eval_spec(meta) -> ViewSpec:
    """The spec of the evaluation view: the training spec if recorded, else the image size the model was built for."""
    augment = _get(meta, "augment")
    if augment:
        return ViewSpec.from_dict(augment)
    size = (_get(meta, "model_kwargs") or {}).get("img_size") or 28
    return ViewSpec(image_size=int(size))


def expand_sets(data: list[str], corrupt_dir: str | None = None) -> dict[str, str]:
    """Name -> manifest path, for the given manifests and every manifest under ``corrupt_dir``."""
    sets = {os.path.splitext(os.path.basename(p))[0]: p for p in data}
    if corrupt_dir:
        for path in sorted(glob.glob(os.path.join(corrupt_dir, "*.json"))):
            sets["corrupt/" + os.path.splitext(os.path.basename(path))[0]] = path
    return sets


def evaluate_checkpoint(checkpoint_path: str, data: list[str], *, corrupt_dir: str | None = None,
                        batch_size: int = 256, num_workers: int = 2, device: str = "auto",
                        out: str | None = None) -> dict:
    """{"checkpoint", "outputs", "sets": {name: {"acc_cls", ["acc_mean"], "samples"}}}; written to ``out`` if set."""
    from shared import checkpoint
    runtime = setup_runtime(device)
    sets = expand_sets(data, corrupt_dir)
    if not sets:
        raise ValueError("nothing to evaluate: pass --data MANIFEST (and/or --corrupt-dir)")
    manifests = {name: Manifest.load(path) for name, path in sets.items()}
    model, meta = checkpoint.load_checkpoint(checkpoint_path)
    classes = _get(meta, "num_classes")
    for name, manifest in manifests.items():
        if classes is not None and manifest.num_classes != int(classes):
            raise ValueError(f"{sets[name]} has {manifest.num_classes} classes, the model {classes}")
    model = model.to(runtime.device).eval()
    spec = eval_spec(meta)
    mean, std = tuple(_get(meta, "mean") or spec.mean), tuple(_get(meta, "std") or spec.std)
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


def format_report(report: dict) -> str:
    lines = [f"{report['checkpoint']} ({report.get('arch')}, {report.get('kind')})"]
    for name, r in report["sets"].items():
        accs = "  ".join(f"{k[4:]}={v * 100:.2f}%" for k, v in r.items() if k.startswith("acc_"))
        lines.append(f"  {name:<24} {accs}  (n={r['samples']})")
    return "\n".join(lines)

