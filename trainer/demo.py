"""``cit demo``: the whole story on low-data Fashion-MNIST in a few minutes of CPU.

    prepare shards -> train a conv and an involution teacher -> cache both over E views (``cit cache build``)
    -> train the CiT student with cached KD, and the same student without KD -> evaluate both heads

Stage 1 runs as its own ``cit cache build`` process (the trainer never imports the cache builder).  Every step is
idempotent: rerunning the demo in the same folder reuses what is already there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import click

from trainer.report import markdown, summarize

CONV_TEACHER = "regnety_002"  # timm conv teacher (small-input stem)
INV_TEACHER = "rednet_small"  # involution teacher


def _cit(*args: str) -> None:
    """Run a ``cit`` subcommand in its own process (stage 1 is a separate program)."""
    cmd = [sys.executable, "-m", "shared.cli", *args]
    click.echo("$ cit " + " ".join(args), err=True)
    subprocess.run(cmd, check=True)


def run_demo(folder: str, config: str, per_class: int = 100, teacher_epochs: int = 10, epochs: int | None = None,
             conv_teacher: str = CONV_TEACHER, inv_teacher: str = INV_TEACHER) -> list[dict]:
    from trainer.teacher import CNN_TEACHER_RECIPE, TeacherSpec, train_teacher
    from trainer.train import load_run_config, train
    data = os.path.join(folder, "data")
    train_json, test_json = os.path.join(data, "train.json"), os.path.join(data, "test.json")
    if not os.path.exists(train_json):
        _cit("data", "prepare", "fashion-mnist", "--out", data, "--per-class", str(per_class))
    paths = {"data.train": train_json, "data.test": test_json, "data.cache": os.path.join(folder, "cache.zarr")}
    sets = [f"{k}={json.dumps(v)}" for k, v in paths.items()]
    teacher_cfg = load_run_config(config, sets + [f"train.epochs={teacher_epochs}", f"train.eval_every={teacher_epochs}",
                                                  *CNN_TEACHER_RECIPE])
    checkpoints = {}
    for name, arch, kind in (("conv", conv_teacher, "conv"), ("inv", inv_teacher, "inv")):
        checkpoints[name] = os.path.join(folder, "teachers", f"{name}.safetensors")
        if not os.path.exists(checkpoints[name]):
            click.echo(f"training the {kind} teacher {arch} ...", err=True)
            options = {"small_input": True} if kind == "conv" else {}
            train_teacher(TeacherSpec(arch, kind, train_json, test_json, checkpoints[name], options), teacher_cfg,
                          resume=os.path.exists(checkpoints[name] + ".run/state.safetensors"))   # a killed demo
    student_cfg = load_run_config(config, sets + ([f"train.epochs={epochs}"] if epochs else []))
    if not os.path.exists(os.path.join(paths["data.cache"], "zarr.json")):
        _cit("cache", "build", "--data", train_json, "--config", config, "--views", str(student_cfg.train.epochs),
             "--out", paths["data.cache"], "--test-data", test_json,
             *[arg for name, path in checkpoints.items() for arg in ("--teacher", f"{name}={path}")])
    runs = []
    for variant, extra in (("cit", []), ("no_kd", ["kd.mode=none"])):
        out = os.path.join(folder, "runs", variant)
        runs.append(out)
        if not os.path.exists(os.path.join(out, "run.json")):
            click.echo(f"training the student ({variant}) ...", err=True)
            cfg = load_run_config(config, sets + extra + ([f"train.epochs={epochs}"] if epochs else []))
            train(cfg, out, resume=os.path.exists(os.path.join(out, "state.safetensors")))   # a killed demo
    return summarize(runs)


@click.command()
@click.option("--folder", default="demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--config", default=os.path.join("configs", "demo.toml"), show_default=True)
@click.option("--per-class", default=100, show_default=True, help="Training images per class.")
@click.option("--teacher-epochs", default=10, show_default=True)
@click.option("--epochs", type=int, default=None, help="Student epochs [the config's; also the cache's E].")
def demo(folder, config, per_class, teacher_epochs, epochs):
    """Prepare data, train two teachers, cache them, train CiT vs no-KD students, print the comparison."""
    rows = run_demo(folder, config, per_class, teacher_epochs, epochs)
    click.echo(markdown(rows))
