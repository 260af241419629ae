"""The ``cit`` command line.  Thin: each command parses options and calls one library function.

Command groups live next to their code and are registered here by one line each in ``SUBCOMMANDS``
(``"name": "module:attribute"``).  They are imported lazily: ``cit data ...`` never imports torch-heavy trainer
code, and a group whose module is missing or broken is left out of ``cit --help`` instead of breaking it.

User errors (``shared.errors.CitUserError``: ShardError, ManifestError, PrepareError, ...), a full disk, a folder
that cannot be written and the like print as ``Error: <one line>`` and exit with code 2, without a traceback (set
``CIT_DEBUG=1`` to get one); Ctrl-C says how to resume and exits with 130 (see ``shared.errors``).
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from shared.errors import CitGroup, set_resume_hint

SUBCOMMANDS: dict[str, str] = {
    "data": "shared.cli:data",
    "cache": "cache_builder.cli:cache",
    "train": "trainer.cli:train",
    "eval": "trainer.cli:evaluate",
    "report": "trainer.cli:report",
    "teacher": "trainer.cli:teacher",
    "models": "shared.models_cli:models",
    "demo": "trainer.demo:demo",
}


class LazyGroup(CitGroup):
    """A click group whose subcommands are ``"module:attribute"`` strings imported on first use."""

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})
        self._loaded: dict[str, click.Command] = {}

    def _load(self, name: str) -> click.Command:
        if name not in self._loaded:
            module_name, attribute = self.lazy_subcommands[name].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy_subcommands[name]} is not a click command")
            self._loaded[name] = command
        return self._loaded[name]

    def list_commands(self, ctx: click.Context) -> list[str]:
        available = []
        for name in self.lazy_subcommands:
            try:
                self._load(name)
                available.append(name)
            except Exception:   # not written yet, or broken: hide it rather than break --help
                pass
        return sorted(set(super().list_commands(ctx)) | set(available))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_subcommands:
            try:
                return self._load(name)
            except Exception as exc:
                raise click.UsageError(f"command {name!r} is unavailable: {type(exc).__name__}: {exc}") from exc
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy_subcommands=SUBCOMMANDS)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(quiet: bool) -> None:
    """cit: offline teacher-logit cache and three-token student trainer (CiT)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# cit data

@click.group(cls=CitGroup)
def data() -> None:
    """Datasets: shards + manifest (prepare, subset, info)."""


@data.group()
def prepare() -> None:
    """Write shards and a manifest from a dataset source."""


def _report(manifests: dict) -> None:
    for manifest in manifests.values():
        click.echo(f"{manifest.path}: {manifest.num_samples} samples, {manifest.num_classes} classes, "
                   f"{len(manifest.shards)} shards, fingerprint {manifest.fingerprint[:16]}")


def _severities(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,3,5, got {value!r}") from None


@prepare.command("fashion-mnist")
@click.option("--source", default=None, metavar="DIR",
              help="Folder with the four *-ubyte.gz files [default: $CIT_FASHION_MNIST or "
                   "/usr/share/datasets/fashion-mnist].")
@click.option("--out", required=True, metavar="DIR", help="Output folder (train.json, test.json, shards).")
@click.option("--shard-size", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--per-class", default=None, type=click.IntRange(min=1), help="Keep N train images per class.")
@click.option("--seed", default=0, show_default=True, help="Seed of the --per-class selection.")
@click.option("--corruptions", is_flag=True, help="Also write corrupted test sets under corrupt/.")
@click.option("--severities", default="1,3,5", show_default=True, callback=_severities,
              help="Corruption severities (1..5).")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Processes [default: all cores].")
@click.option("--force", is_flag=True, help="Replace existing output made from other input or options.")
def prepare_fashion_mnist_cmd(source, out, shard_size, per_class, seed, corruptions, severities, workers, force):
    """Fashion-MNIST IDX files -> train/test shards (+ corrupted test sets)."""
    from shared.prepare import DEFAULT_FASHION_MNIST, prepare_fashion_mnist
    set_resume_hint(f"splits finished in {out} are kept: rerun the same command to prepare the rest")
    _report(prepare_fashion_mnist(source or DEFAULT_FASHION_MNIST, out, shard_size, per_class, seed, corruptions,
                                  severities, force=force, workers=workers))


@prepare.command("folder")
@click.argument("root", metavar="ROOT")
@click.option("--out", required=True, metavar="DIR", help="Output folder (<split>.json + <split>/ shards).")
@click.option("--split", "split_name", required=True, metavar="NAME", help="Split name, e.g. train or val.")
@click.option("--shard-size", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--per-class", default=None, type=click.IntRange(min=1), help="Keep N images per class.")
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle and the --per-class selection.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Processes [default: all cores].")
@click.option("--force", is_flag=True, help="Replace existing output made from other input or options.")
def prepare_folder_cmd(root, out, split_name, shard_size, per_class, seed, workers, force):
    """ImageFolder tree (ROOT/<class>/<image>) -> one split of shards."""
    from shared.prepare import prepare_image_folder
    set_resume_hint(f"rerun the same command to prepare split {split_name} again")
    _report({split_name: prepare_image_folder(root, out, split_name, shard_size, per_class, seed, force=force,
                                              workers=workers)})


@prepare.command("scan")
@click.argument("urls", nargs=-1, required=True, metavar="URL_OR_GLOB...")
@click.option("--out", default=None, metavar="MANIFEST", help="Manifest path [default: manifest.json beside the "
                                                              "first shard].")
@click.option("--num-classes", default=None, type=click.IntRange(min=1), help="[default: max cls + 1]")
@click.option("--class-names", default=None, metavar="A,B,...", help="Comma-separated class names.")
@click.option("--skip-bad", is_flag=True, help="Record bad samples in the manifest instead of failing.")
@click.option("--channels", default=None, type=click.Choice(["1", "3"]),
              help="Decode every image to 1 (L) or 3 (RGB) channels [default: 1 if all images are grey, else 3].")
@click.option("--force", is_flag=True, help="Replace an existing manifest describing other shards or options.")
def prepare_scan_cmd(urls, out, num_classes, class_names, skip_bad, force, channels=None):
    """Existing WebDataset shards -> manifest (validates every sample; never modifies the shards)."""
    from shared.prepare import scan_shards
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    manifest = scan_shards(list(urls), out, num_classes, names, skip_bad, force=force,
                           channels=int(channels) if channels else None)
    _report({"": manifest})
    if manifest.skipped:
        click.echo(f"skipped {len(manifest.skipped)} bad sample(s), listed in the manifest")


@data.command("subset")
@click.argument("manifest_path", metavar="MANIFEST")
@click.option("--per-class", type=int, default=None, help="Keep N random rows of every class.")
@click.option("--fraction", type=float, default=None, help="Keep this fraction of the rows, drawn at random.")
@click.option("--classes", default=None, metavar="C1,C2,...", help="Keep every row of these class ids.")
@click.option("--seed", type=int, default=0, show_default=True, help="Draws the rows (--per-class, --fraction).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The subset's manifest (JSON).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def subset_cmd(manifest_path, per_class, fraction, classes, seed, out, force):
    """Manifest of a subset of MANIFEST's rows (same shards); trains from a cache built on MANIFEST."""
    import os
    from shared.errors import CitError
    from shared.subset import SubsetRule, subset_manifest
    if os.path.exists(out) and not force:
        raise CitError(f"--out {out} already exists; pass --force to replace it")
    try:
        picked = tuple(int(c) for c in classes.split(",") if c.strip()) if classes else None
    except ValueError:
        raise CitError(f"--classes {classes!r} must be comma-separated class ids, e.g. 0,3,7") from None
    manifest = subset_manifest(manifest_path, SubsetRule(per_class, fraction, picked, seed), out)
    _report({"": manifest})


@data.command("info")
@click.argument("manifest_path", metavar="MANIFEST")
@click.option("--verify", is_flag=True, help="Also check every shard's size, sha256 and sample count.")
def info_cmd(manifest_path, verify):
    """Summary of a manifest: samples, classes, shards, fingerprint."""
    from shared.manifest import Manifest, check_shards
    manifest = Manifest.load(manifest_path)
    names = ", ".join(manifest.class_names[:10]) + (", ..." if manifest.num_classes > 10 else "")
    lines = [("name", manifest.name), ("samples", manifest.num_samples),
             ("classes", f"{manifest.num_classes} ({names})"), ("channels", manifest.channels),
             ("shards", len(manifest.shards)),
             ("fingerprint", manifest.fingerprint), ("skipped", len(manifest.skipped))]
    lines += [(f"source.{k}", v) for k, v in manifest.source.items() if k not in ("files", "recipe")]
    for label, value in lines:
        click.echo(f"{label:>20}: {value}")
    if verify:
        check_shards(manifest, sha256=True, count=True)
        click.echo(f"{'verified':>20}: all {len(manifest.shards)} shards match their size, sha256 and count")
if __name__ == "__main__":
    main()
