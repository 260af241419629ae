"""``cit teacher import``: published weights (timm, torchvision ResNets, the official RedNets) -> a teacher checkpoint.

The library part is ``shared.models.importers``; this module saves the result as a project checkpoint (safetensors +
sidecar, the source file's sha256 recorded) and, with ``--test-data``, measures its accuracy with ``cit eval``'s
code and records it. Only click is imported at module level: torch loads when the command runs.
"""
from __future__ import annotations

import os

import click

# the choices of shared.models.importers (INTERPOLATIONS, SOURCES), repeated so `--help` needs no torch import;
# tests/test_import.py checks they agree
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
SOURCES = ("auto", "timm", "torchvision", "mmcls", "coadvise")


class ImportRefused(click.ClickException):
    """A user error: printed as ``Error: <message>``, exit code 2."""
    exit_code = 2


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.485,0.456,0.406, got {value!r}") from None


def image_channels(manifest) -> int:
    """Channels of the first sample's evaluation view (what a model fed from this manifest receives)."""
    from shared.augment import ViewSpec
    from shared.reader import Piece, read_piece
    from shared.views import render_eval
    shard = next((s for s in manifest.shards if s.samples), None)
    if shard is None:
        raise ValueError(f"manifest {manifest.path} lists no samples")
    raw = read_piece(manifest, Piece(manifest.shards.index(shard), shard.start, shard.start + 1))[0]
    return int(render_eval(ViewSpec(image_size=8), raw).shape[0])


def import_teacher(spec, out: str, test_data: str | None = None, force: bool = False, batch_size: int = 64,
                   workers: int = 0, device: str = "auto"):
    """Import ``spec`` (an ``ImportSpec``) to checkpoint ``out``; returns its meta (with the test accuracy)."""
    from shared import checkpoint
    from shared.manifest import Manifest
    from shared.models.importers import WeightsImportError, import_weights
    if os.path.exists(out) and not force:
        raise WeightsImportError(f"{out} exists; pass --force to replace it")
    test = Manifest.load(test_data) if test_data else None
    model, meta = import_weights(spec)
    if test is not None:
        if test.num_classes != meta.num_classes:
            raise WeightsImportError(f"{test_data} has {test.num_classes} classes, the weights {meta.num_classes}")
        channels = image_channels(test)
        if channels != meta.in_chans:
            raise WeightsImportError(f"{test_data}: images have {channels} channel(s), the weights take "
                                     f"{meta.in_chans}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = checkpoint.save_checkpoint(model, out, meta)
    if test is not None:
        from trainer.evaluate import evaluate_checkpoint
        report = evaluate_checkpoint(out, [test_data], batch_size=batch_size, num_workers=workers, device=device)
        result = next(iter(report["sets"].values()))
        meta.test_accuracy = float(result["acc_cls"])
        meta.extra.update(test_fingerprint=test.fingerprint, test_samples=int(result["samples"]))
        checkpoint.write_meta(out, meta)
    return meta


@click.command("import")
@click.option("--arch", required=True,
              help="timm model name, optionally with its pretrained tag (regnety_032.ra_in1k), or rednet26/38/50/101.")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="Local weights: .safetensors, or .pth/.bin read with torch.load(weights_only=True).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.safetensors).")
@click.option("--from", "source", type=click.Choice(SOURCES), default="auto", show_default=True,
              help="Naming of the weights: timm's, torchvision ResNets, mmcls (official RedNet: backbone.*, "
                   "head.fc.*), co-advise (model.*, classifier.*); auto detects it.")
@click.option("--kind", type=click.Choice(["conv", "inv", "other"]), help="[default: inv for RedNets, else conv]")
@click.option("--num-classes", type=click.IntRange(min=1), help="[default: from the classifier's weights]")
@click.option("--key", help="Entry of a wrapped checkpoint holding the weights [default: state_dict, model, module].")
@click.option("--input-size", type=click.IntRange(min=1), help="Input side [default: the pretrained config's].")
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), help="[default: the pretrained config's]")
@click.option("--mean", callback=_floats, metavar="M1,M2,M3", help="Input mean [default: the pretrained config's].")
@click.option("--std", callback=_floats, metavar="S1,S2,S3", help="Input std [default: the pretrained config's].")
@click.option("--small-input", is_flag=True, help="Build the 28-32 px stem (stride 1, no max-pool).")
@click.option("--allow-stem-change", is_flag=True,
              help="With --small-input: load the stock weights into the changed stem anyway (the changes are named).")
@click.option("--test-data", metavar="MANIFEST", help="Measure the top-1 accuracy on this test split and record it.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint at --out.")
def teacher_import(arch, weights, out, source, kind, num_classes, key, input_size, interpolation, mean, std,
                   small_input, allow_stem_change, test_data, batch_size, workers, device, force):
    """Import published weights as a teacher checkpoint (input config from timm's pretrained config)."""
    from shared.checkpoint import CheckpointError
    from shared.manifest import ManifestError
    from shared.models.importers import ImportSpec
    try:
        spec = ImportSpec(arch=arch, weights=weights, source=source, kind=kind, num_classes=num_classes, key=key,
                          input_size=input_size, interpolation=interpolation, mean=mean, std=std,
                          small_input=small_input, allow_stem_change=allow_stem_change)
        meta = import_teacher(spec, out, test_data, force=force, batch_size=batch_size, workers=workers,
                              device=device)
    except (CheckpointError, ManifestError) as exc:
        raise ImportRefused(str(exc)) from None
    src = meta.extra["imported_from"]
    click.echo(f"{out}: {meta.arch} ({meta.kind}, {meta.num_classes} classes, {meta.in_chans} channels) from "
               f"{src['path']} ({src['names']} names, {src['tensors']} tensors, sha256 {src['sha256'][:12]}); "
               f"input {meta.img_size} px {meta.interpolation}, mean {meta.mean}, std {meta.std} "
               f"({src['input_config']})")
    if meta.test_accuracy is not None:
        click.echo(f"test accuracy on {test_data}: {meta.test_accuracy * 100:.2f}% "
                   f"(n={meta.extra['test_samples']})")
