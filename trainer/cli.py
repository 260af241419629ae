"""Thin click commands: parse options into config overrides, call one library function.

User errors propagate to the ``cit`` group (``shared.errors.CitGroup``), which prints them as one line with exit
code 2; each command first says how its work is resumed, for Ctrl-C and a full disk."""
from __future__ import annotations

import json
import sys

import click

from shared.errors import CitError, CitGroup, set_resume_hint, with_resume_flag


def _overrides(pairs: dict[str, object], sets: tuple[str, ...]) -> list[str]:
    """Named CLI options become ``section.key=value`` overrides, applied before the explicit ``--set`` ones."""
    out = [f"{key}={json.dumps(value)}" for key, value in pairs.items() if value is not None]
    return out + list(sets)


def _fail(exc: Exception) -> None:
    raise CitError(str(exc)) from None


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--data", help="Training manifest (data.train).")
@click.option("--test-data", help="Test manifest, evaluated after every epoch (data.test).")
@click.option("--cache", help="Logit cache URL (data.cache).")
@click.option("--kd", type=click.Choice(["cached", "online", "none"]), help="Distillation mode (kd.mode).")
@click.option("--conv-teacher", help="Cached teacher feeding the conv token (kd.conv_teacher).")
@click.option("--inv-teacher", help="Cached teacher feeding the inv token (kd.inv_teacher).")
@click.option("--student", help="Student architecture (student.arch).")
@click.option("--epochs", type=int, help="train.epochs")
@click.option("--batch-size", type=int, help="Per-rank batch size (train.batch_size).")
@click.option("--allow-repeat-views", is_flag=True, default=None, help="Allow more epochs than cached views.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue from <out>/state.safetensors.")
@click.option("--force", is_flag=True, help="Replace a run already in --out (finished or not).")
@click.option("--no-verify-shards", "no_verify_shards", is_flag=True, default=None,
              help="At start, check shards' existence and size only, not their sha256 (data.verify_shards).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Config override (repeatable).")
def train(config, data, test_data, cache, kd, conv_teacher, inv_teacher, student, epochs, batch_size,
          allow_repeat_views, out, resume, force, sets, no_verify_shards=None):
    """Train a student (CiT) from a config; `torchrun --nproc-per-node N -m trainer.cli train ...` for DDP."""
    from trainer.train import load_run_config, train as run
    set_resume_hint(f"the last finished epoch in {out} is kept; continue with: {with_resume_flag()}")
    pairs = {"data.train": data, "data.test": test_data, "data.cache": cache, "kd.mode": kd,
             "kd.conv_teacher": conv_teacher, "kd.inv_teacher": inv_teacher, "student.arch": student,
             "train.epochs": epochs, "train.batch_size": batch_size, "data.allow_repeat_views": allow_repeat_views,
             "data.verify_shards": False if no_verify_shards else None}
    cfg = load_run_config(config, _overrides(pairs, sets))
    run(cfg, out, resume=resume, force=force)


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="Model checkpoint.")
@click.option("--data", "data", multiple=True, help="Test manifest (repeatable).")
@click.option("--corrupt-dir", type=click.Path(file_okay=False), help="Also every manifest in this folder.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--teacher", "teachers", multiple=True, metavar="NAME=CHECKPOINT",
              help="Compare each student head with this teacher: accuracies and KL(teacher || head) (repeatable).")
def evaluate(checkpoint, data, corrupt_dir, batch_size, workers, device, out, teachers):
    """Accuracy of a student (class head and mean of heads) or teacher on test sets and corrupted copies."""
    from trainer.evaluate import evaluate_agreement, evaluate_checkpoint, format_agreement, format_report
    named = dict(t.split("=", 1) for t in teachers if "=" in t)
    if len(named) != len(teachers):
        _fail(ValueError(f"--teacher takes NAME=CHECKPOINT, got {', '.join(t for t in teachers if '=' not in t)}"))
    try:
        if named:
            report = evaluate_agreement({"student": checkpoint}, named, list(data), corrupt_dir=corrupt_dir,
                                        batch_size=batch_size, num_workers=workers, device=device, out=out)
            click.echo(format_agreement(report))
            return
        report = evaluate_checkpoint(checkpoint, list(data), corrupt_dir=corrupt_dir, batch_size=batch_size,
                                     num_workers=workers, device=device, out=out)
    except ValueError as exc:
        _fail(exc)
    click.echo(format_report(report))


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Write the table as JSON.")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False), help="Write the table as Markdown.")
def report(runs, out, markdown_out):
    """Ablation table over `cit train` output folders: mean ± std over seeds per variant."""
    from trainer.report import markdown, report as run_report
    try:
        rows = run_report(list(runs), out, markdown_out)
    except ValueError as exc:
        _fail(exc)
    click.echo(markdown(rows))


@click.group(cls=CitGroup)
def teacher():
    """Teacher models."""


@teacher.command("train")
@click.option("--arch", required=True, help="Model name for shared.models.create_model (e.g. rednet_small).")
@click.option("--kind", required=True, type=click.Choice(["conv", "inv", "other"]))
@click.option("--data", required=True, help="Training manifest.")
@click.option("--test-data", required=True, help="Test manifest (accuracy each epoch, stored in the checkpoint).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint path.")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config ([train] [augment] [data] [loss]).")
@click.option("--epochs", type=int)
@click.option("--resume", is_flag=True, help="Continue from <out>.run/state.safetensors.")
@click.option("--force", is_flag=True, help="Replace a checkpoint (or unfinished training) already at --out.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Extra create_model keyword.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE")
def teacher_train(arch, kind, data, test_data, out, config, epochs, resume, force, options, sets):
    """Train a teacher on the replayable augmentation; saves the checkpoint with its test accuracy."""
    import tomllib
    from trainer.teacher import TeacherSpec, train_teacher
    from trainer.train import load_run_config
    set_resume_hint(f"the last finished epoch in {out}.run is kept; continue with: {with_resume_flag()}")
    extra = {}
    for item in options:
        key, _, raw = item.partition("=")
        if not _ or not key:
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE", param_hint="--option")
        try:
            extra[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            extra[key] = raw
    cfg = load_run_config(config, _overrides({"train.epochs": epochs}, sets))
    train_teacher(TeacherSpec(arch, kind, data, test_data, out, extra), cfg, resume=resume, force=force)


from trainer.teacher_import import teacher_import  # noqa: E402  (click only; torch loads when the command runs)
teacher.add_command(teacher_import)


if __name__ == "__main__":   # torchrun -m trainer.cli train ...
    group = CitGroup(commands={"train": train, "teacher": teacher, "eval": evaluate, "report": report})
    sys.exit(group())
