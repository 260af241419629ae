"""``cit cache build | extend | add-teacher | merge | export | info | verify`` — thin: parse options, call one library function, print its summary."""
from __future__ import annotations

import json
import logging

import click

from shared.cache_schema import CacheError
from shared.config import ConfigError
from shared.errors import CitGroup, set_resume_hint
from shared.manifest import ManifestError


def _storage_options(items: tuple[str, ...]) -> dict | None:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE", param_hint="--storage-option")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out or None


class CacheCommandError(click.ClickException):
    """A refused build or unreadable cache: ``Error: <message>``, exit code 2 (as every ``cit`` library error)."""
    exit_code = 2


def _fail(exc: Exception) -> click.ClickException:
    return CacheCommandError(str(exc))


@click.group(cls=CitGroup)
def cache():
    """Stage 1: build, inspect and verify the offline teacher-logit cache (Zarr v3)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@cache.command()
@click.option("--data", required=True, help="Manifest (JSON) of the training shards.")
@click.option("--teacher", "teachers", multiple=True, required=True, metavar="NAME=CHECKPOINT",
              help="A teacher to cache; repeat for several.  NAME becomes its group in the store.")
@click.option("--views", "-E", "views", type=int, required=True, help="Views per sample (E).")
@click.option("--views-from", "first_view", type=int, default=0, show_default=True, metavar="F",
              help="Build only views F..E-1 of the E-view cache (e.g. on a second machine); `cit cache merge` "
              "joins it with the cache of views 0..F-1.")
@click.option("--topk", "-K", "topk", type=int, default=10, show_default=True, help="Logits kept per view (K).")
@click.option("--out", required=True, help="Output URL: a path, file://, s3://, memory://.")
@click.option("--temperatures", default="1", show_default=True, metavar="T1,T2,...",
              help="KD temperatures at which the target is stored exactly (~1.2 B per view and teacher each "
              "at C=1000, K=10).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config; its [augment] section is the augmentation spec.")
@click.option("--set", "overrides", multiple=True, metavar="augment.KEY=VALUE", help="Override a config value.")
@click.option("--seed", type=int, default=None, help="View seed [the config's data.view_seed, else 0].")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Teacher batch size (part of the cache identity: changes the bits).")
@click.option("--workers", type=int, default=None,
              help="DataLoader workers rendering views [1 on CPU, min(8, cores) on CUDA].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--chunk-rows", type=int, default=None,
              help="Rows per chunk = work unit [the most common shard size, at most 4096].")
@click.option("--threads", type=int, default=None,
              help="CPU builds: intra-op threads per process, pinned per cache (part of its identity: CPU kernels "
              "round differently with another count) [a new cache: torch's default; a resume: the stored count].")
@click.option("--test-data", default=None, help="Manifest of the test split: each teacher's accuracy is measured "
              "on its eval views before the build and stored in the cache.")
@click.option("--min-teacher-acc", type=float, default=None, help="Refuse teachers below this test accuracy (0..1).")
@click.option("--force", is_flag=True, help="Replace an existing cache at --out.")
@click.option("--no-verify-shards", is_flag=True, help="Only check the shards exist (skip sha256 of every shard).")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for --out (e.g. endpoint_url=http://host:port); env vars work too.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--features", type=click.Choice(["none", "pooled"]), default="none", show_default=True,
              help="Also store each teacher's pooled penultimate features per view (for feature / relation KD; "
                   "uint8 codes + a per-view scale, ~1 B per feature dimension).")
def build(data, teachers, views, topk, out, temperatures, config_path, overrides, seed, batch_size, workers, device,
          precision, chunk_rows, threads, test_data, min_teacher_acc, force, no_verify_shards, storage_options, no_progress,
          first_view, features):
    """Run the teachers over E replayable views of every sample and store their top-k targets (resumable)."""
    from cache_builder.build import BuildSettings, build_cache
    from cache_builder.errors import BuildError
    from shared.augment import ViewSpec
    from shared.config import load_config, section
    from shared.reader import distributed_context
    set_resume_hint(f"finished units in {out} are kept: rerun the same command to resume the build")
    try:
        foreign = [o for o in overrides if not o.strip().startswith("augment.")]
        if foreign:
            raise ConfigError(f"`cit cache build --set` takes augment.* options only, got {foreign}")
        cfg = load_config(config_path, overrides)
        spec = section(cfg, "augment", ViewSpec)
        if seed is None:
            seed = int(cfg.get("data", {}).get("view_seed", 0))
        settings = BuildSettings(data, list(teachers), out, views=views, topk=topk, spec=spec, seed=seed,
                                 temperatures=temperatures, batch_size=batch_size, workers=workers, device=device,
                                 precision=precision, chunk_rows=chunk_rows, threads=threads, test_data=test_data,
                                 min_teacher_acc=min_teacher_acc, force=force, verify_shards=not no_verify_shards,
                                 storage_options=_storage_options(storage_options), progress=not no_progress,
                                 first_view=first_view, features="" if features == "none" else features)
        summary = build_cache(settings)
    except (BuildError, CacheError, ConfigError, ManifestError, ValueError) as exc:
        raise _fail(exc) from None
    if distributed_context()[0] == 0:
        click.echo(summary.line())


def _grow_options(f):
    """Options shared by ``extend`` and ``add-teacher`` (everything else comes from the cache)."""
    for option in reversed([
            click.option("--data", required=True, help="Manifest the cache was built from (fingerprint checked)."),
            click.option("--device", default="auto", show_default=True,
                         help="Must be the device type the cache was built on (it changes the bits)."),
            click.option("--workers", type=int, default=None, help="DataLoader workers rendering views."),
            click.option("--no-verify-shards", is_flag=True, help="Skip the sha256 check of every shard."),
            click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE"),
            click.option("--no-progress", is_flag=True, help="No progress bar.")]):
        f = option(f)
    return f


def _grow_settings(data, device, workers, no_verify_shards, storage_options, no_progress, **extra):
    """The options every rank of a ``torchrun`` change gets alike."""
    from cache_builder.grow import GrowSettings
    return GrowSettings(data=data, device=device, workers=workers, verify_shards=not no_verify_shards,
                        storage_options=_storage_options(storage_options), progress=not no_progress, **extra)


@cache.command()
@click.argument("url")
@click.option("--views", "-E", "views", type=int, required=True, help="The new number of views E2 (> E).")
@click.option("--teacher", "teachers", multiple=True, metavar="NAME=CHECKPOINT",
              help="Checkpoint of a cached teacher [the path recorded in the cache]; its sha256 must match.")
@_grow_options
def extend(url, views, teachers, **options):
    """Add views E..E2-1 to a complete cache: equals a fresh build with E2 views; old views untouched (resumable)."""
    from cache_builder.errors import BuildError
    from cache_builder.grow import extend_cache
    from shared.reader import distributed_context
    set_resume_hint(f"finished units in {url} are kept: rerun the same command to resume")
    try:
        summary = extend_cache(url, views, _grow_settings(teachers=tuple(teachers), **options))
    except (BuildError, CacheError, ManifestError, ValueError) as exc:
        raise _fail(exc) from None
    if distributed_context()[0] == 0:
        click.echo(summary.line())


@cache.command("add-teacher")
@click.argument("url")
@click.argument("teachers", nargs=-1, required=True, metavar="NAME=CHECKPOINT...")
@click.option("--test-data", default=None, help="Manifest of the test split: the new teachers' accuracy.")
@_grow_options
def add_teacher(url, teachers, test_data, **options):
    """Add teacher groups (in the order given) to a complete cache: equals a fresh build with all the teachers."""
    from cache_builder.errors import BuildError
    from cache_builder.grow import add_teachers
    from shared.reader import distributed_context
    set_resume_hint(f"finished units in {url} are kept: rerun the same command to resume")
    try:
        summary = add_teachers(url, list(teachers), _grow_settings(test_data=test_data, **options))
    except (BuildError, CacheError, ManifestError, ValueError) as exc:
        raise _fail(exc) from None
    if distributed_context()[0] == 0:
        click.echo(summary.line())


@cache.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", required=True, help="The merged cache (URL).")
@click.option("--force", is_flag=True, help="Replace whatever is at --out.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE")
def merge(a, b, out, force, storage_options):
    """Join the teachers and view ranges of two caches of the same data and settings (checked), without teachers."""
    from cache_builder.assemble import merge_caches
    from cache_builder.errors import BuildError
    set_resume_hint(f"units copied to {out} are kept: rerun the same command to resume")
    try:
        summary = merge_caches(a, b, out, force=force, storage_options=_storage_options(storage_options))
    except (BuildError, CacheError) as exc:
        raise _fail(exc) from None
    click.echo(summary.line())


@cache.command()
@click.argument("src")
@click.option("--teachers", default=None, metavar="NAME1,NAME2", help="Teachers to keep, in this order [all].")
@click.option("--views", "-E", "views", type=int, default=None, help="Keep views up to E-1 [all].")
@click.option("--views-from", "first_view", type=int, default=None, metavar="F",
              help="Keep views from F on (F > 0: a view range cache) [the source's first view, 0].")
@click.option("--out", required=True, help="The exported cache (URL).")
@click.option("--force", is_flag=True, help="Replace whatever is at --out.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE")
def export(src, teachers, views, first_view, out, force, storage_options):
    """A smaller cache for sharing: some teachers and a range of views; equals a fresh build of those."""
    from cache_builder.assemble import export_cache
    from cache_builder.errors import BuildError
    set_resume_hint(f"units copied to {out} are kept: rerun the same command to resume")
    names = [n.strip() for n in teachers.split(",") if n.strip()] if teachers else None
    try:
        summary = export_cache(src, out, teachers=names, views=views, first_view=first_view, force=force,
                               storage_options=_storage_options(storage_options))
    except (BuildError, CacheError) as exc:
        raise _fail(exc) from None
    click.echo(summary.line())


@cache.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE")
@click.option("--fidelity", is_flag=True, help="Per teacher: distribution of the top-1 probability, the top-k "
              "coverage and the tail mass at each cached τ on M random views (text and a PNG).")
@click.option("--sample", type=int, default=1000, show_default=True, metavar="M", help="--fidelity: views sampled.")
@click.option("--teacher", "teachers", multiple=True, metavar="NAME=CHECKPOINT",
              help="--fidelity: also KL(live teacher ‖ cached target) at each cached τ (needs --data).")
@click.option("--data", default=None, help="--fidelity --teacher: the manifest the cache was built from.")
@click.option("--png", default="cache-fidelity.png", show_default=True, help="--fidelity: where the plot goes.")
@click.option("--device", default="auto", show_default=True, help="--fidelity --teacher: where teachers run.")
@click.option("--seed", type=int, default=0, show_default=True, help="--fidelity: which random views.")
def info(url, as_json, storage_options, fidelity, sample, teachers, data, png, device, seed):
    """Teachers, accuracy, K, E, N, fingerprint, size on disk, bytes per view per teacher, completeness."""
    from cache_builder.info import cache_info, format_info
    try:
        if fidelity:
            _fidelity(url, as_json, storage_options, sample, teachers, data, png, device, seed)
            return
        result = cache_info(url, _storage_options(storage_options))
    except CacheError as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(result, indent=1) if as_json else format_info(result))


def _fidelity(url, as_json, storage_options, sample, teachers, data, png, device, seed) -> None:
    from cache_builder.errors import BuildError
    from cache_builder.teachers import parse_teacher_args
    from cache_builder.fidelity import FidelityOptions, cache_fidelity, fidelity_png, format_fidelity, public
    try:
        pairs = dict(parse_teacher_args(teachers)) if teachers else {}
    except BuildError as exc:
        raise CacheError(str(exc)) from None
    options = FidelityOptions(sample=sample, teachers=pairs, data=data, device=device, seed=seed,
                              storage_options=_storage_options(storage_options))
    report = cache_fidelity(url, options)
    fidelity_png(report, png)
    click.echo(json.dumps(public(report), indent=1) if as_json else format_fidelity(report) + f"\nplot: {png}")


@cache.command()
@click.argument("url")
@click.option("--data", default=None, help="Manifest the cache should have been built from (fingerprint check).")
@click.option("--recompute", type=int, default=0, show_default=True, metavar="M",
              help="Re-run the teachers on M random stored views and compare.")
@click.option("--teacher", "teachers", multiple=True, metavar="NAME=CHECKPOINT",
              help="Checkpoint for --recompute (default: the path recorded at build time).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Which random views --recompute and --pixels --sample pick.")
@click.option("--pixels", is_flag=True, help="Re-render stored views from the shards (needs --data) and check their "
              "params records and pixel digests; no teacher needed.")
@click.option("--sample", type=click.IntRange(min=0), default=0, show_default=True, metavar="M",
              help="With --pixels: check M random views instead of all.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(url, data, recompute, teachers, device, seed, pixels, sample, storage_options, as_json):
    """Check structure, completeness, fingerprint, finiteness, index range, sorting (and recompute M views)."""
    from cache_builder.verify import verify_cache
    try:
        report = verify_cache(url, data=data, recompute=recompute, teachers=list(teachers) or None,
                              storage_options=_storage_options(storage_options), device=device, seed=seed,
                              pixels=pixels, sample=sample)
    except (CacheError, ManifestError, ValueError) as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps({"url": report.url, "ok": report.ok, "problems": report.problems,
                               "passed": report.passed, "recomputed": report.recomputed}, indent=1))
    else:
        click.echo(report.text())
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    cache()
