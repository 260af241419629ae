"""``cit demo``: the whole pipeline on low-data Fashion-MNIST in a few minutes on two CPU cores.

    prepare   cit data prepare     100 training images per class; the first 2,000 test images as the test set
    teachers  cit teacher train    a conv and an involution teacher (test accuracy measured once, after training)
    cache     cit cache build      both teachers once over E views of every training image
    students  cit train            the CiT student from the cache, the same student with online teachers, no KD
    eval      test accuracy of every run (measured by its training), seconds per epoch side by side, a PNG

Each step is a ``cit`` command in its own process, printed before it starts.  Steps that do not need each other
run side by side, one core and one thread each (``lanes``), which keeps both cores of a small machine busy and
gives the students equal footing for the seconds-per-epoch comparison: the no-KD student needs no teacher and
trains beside the involution teacher; the online student needs the checkpoints but not the cache, so it trains
beside the cache build and the cached student.  Every step is idempotent: rerunning the demo in the same folder
reuses what is already there (delete the folder to measure again).
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import click

CONV_TEACHER = "regnety_002"  # timm conv teacher (small-input stem)
INV_TEACHER = "rednet_small"  # involution teacher
RESULTS_SECTION = "README.md, section \"The paper's claims at small scale\""


@dataclass
class DemoOptions:
    folder: str = "demo"
    config: str = os.path.join("configs", "demo.toml")
    per_class: int = 100              # training images per class
    test_samples: int = 2000          # the test subset every accuracy is measured on
    teacher_epochs: int = 5
    epochs: int | None = None         # student epochs = cached views E [the config's train.epochs]
    source: str | None = None         # Fashion-MNIST IDX folder [cit data prepare's default]


@dataclass
class Step:
    """One ``cit`` command, skipped when ``done`` (a file it writes last) exists."""
    name: str
    args: list[str]
    done: str
    partial: str | None = None        # a file a killed run leaves behind: rerun with --resume
    seconds: float | None = None      # wall time of this run (None: reused)
    cpu_seconds: float | None = None  # user + sys of its process tree


@dataclass
class Timings:
    """Wall and CPU seconds of every step, kept in ``<folder>/timings.json`` so a rerun still reports them."""
    path: str
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "Timings":
        try:
            with open(path) as f:
                return cls(path, **json.load(f))
        except FileNotFoundError:
            return cls(path)

    def record(self, step: Step) -> None:
        self.seconds[step.name], self.cpu_seconds[step.name] = round(step.seconds, 1), round(step.cpu_seconds, 1)
        from shared.io import atomic_write_text
        atomic_write_text(self.path, json.dumps({"seconds": self.seconds, "cpu_seconds": self.cpu_seconds},
                                                indent=1))


def _cit(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *args]


def is_done(step: Step) -> bool:
    """``done`` exists; for a cache (its ``zarr.json``, written first) also its status is complete."""
    if not os.path.exists(step.done):
        return False
    if step.done.endswith("zarr.json"):
        with open(step.done) as f:
            return json.load(f).get("attributes", {}).get("status") == "complete"
    return True


def _echo_command(step: Step, lane: str = "") -> None:
    reused = is_done(step)
    click.echo(f"{lane}$ cit {shlex.join(step.args)}" + ("   (done before: reused)" if reused else ""), err=True)


def run_steps(steps: list[Step], timings: Timings, threads: int, log_dir: str) -> None:
    """Run the steps one after the other in this lane; output goes to ``<log_dir>/<name>.log``."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for step in steps:
        if is_done(step):
            continue
        args = step.args + (["--resume"] if step.partial and os.path.exists(step.partial) else [])
        log = os.path.join(log_dir, f"{step.name}.log")
        started = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(_cit(args), stdout=f, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)     # this child's own CPU time (lanes run concurrently)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            with open(log) as f:
                tail = "".join(f.readlines()[-15:])
            raise click.ClickException(f"step {step.name} failed (exit {code}); the end of {log}:\n{tail}")
        step.seconds = time.perf_counter() - started
        step.cpu_seconds = usage.ru_utime + usage.ru_stime
        timings.record(step)
        click.echo(f"   {step.name} done in {step.seconds:.0f} s ({step.cpu_seconds:.0f} CPU-s)", err=True)


def run_lanes(lanes: list[list[Step]], timings: Timings, log_dir: str) -> None:
    """Run the lanes side by side, one thread per process each; an error in any lane is raised."""
    threads = max(1, (os.cpu_count() or 2) // len(lanes))
    for i, lane in enumerate(lanes):
        for step in lane:
            _echo_command(step, f"[core {i + 1}] " if len(lanes) > 1 else "")
    errors: list[BaseException] = []

    def work(lane: list[Step]) -> None:
        try:
            run_steps(lane, timings, threads, log_dir)
        except BaseException as exc:  # noqa: BLE001 — re-raised in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(lane,)) for lane in lanes]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def subset_manifest(test_json: str, samples: int) -> str:
    """A manifest of the first whole shards of ``test_json`` holding at least ``samples`` images (cheaper,
    still enough to rank models a few points apart); written beside it as ``<name>-<samples>.json``."""
    import dataclasses

    from shared.manifest import Manifest
    sub_json = test_json.replace(".json", f"-{samples}.json")
    if not os.path.exists(sub_json):
        full = Manifest.load(test_json)
        shards, n = [], 0
        for s in full.shards:
            if n >= samples:
                break
            shards.append(dataclasses.replace(s))
            n += s.samples
        kept = {s.url for s in shards}
        Manifest(shards=shards, num_classes=full.num_classes, class_names=full.class_names,
                 name=full.name + f"[:{n}]", skipped=[s for s in full.skipped if s.get("shard") in kept],
                 source=full.source, channels=full.channels).save(sub_json)
    return sub_json


def student_runs(o: DemoOptions, data: dict[str, str], views: int, checkpoints: dict[str, str]) -> dict[str, Step]:
    """The three students: the same config and views; only how the teachers' targets arrive differs."""
    runs = os.path.join(o.folder, "runs")
    common = [o.config, "--data", data["train"], "--test-data", data["test"], "--epochs", str(views),
              "--set", "train.progress=false"]
    no_cache = ["--set", 'data.cache=""', "--set", f"data.views={views}"]   # the cache's views, without the cache
    online = [a for name, path in checkpoints.items() for a in ("--set", f"kd.checkpoints.{name}={json.dumps(path)}")]
    variants = {"cached": ["--cache", data["cache"]], "online": ["--kd", "online", *no_cache, *online],
                "no_kd": ["--kd", "none", *no_cache]}
    return {name: Step(f"student-{name}", ["train", *common, *extra, "--out", os.path.join(runs, name)],
                       os.path.join(runs, name, "run.json"), os.path.join(runs, name, "state.safetensors"))
            for name, extra in variants.items()}


def run_demo(o: DemoOptions) -> dict:
    """prepare -> teachers -> cache -> students; returns the summary ``print_summary`` shows."""
    from trainer.teacher import CNN_TEACHER_RECIPE
    from trainer.train import load_run_config
    os.makedirs(os.path.join(o.folder, "logs"), exist_ok=True)
    log_dir = os.path.join(o.folder, "logs")
    timings = Timings.load(os.path.join(o.folder, "timings.json"))
    views = o.epochs or load_run_config(o.config).train.epochs

    folder = os.path.join(o.folder, "data")
    prepare = Step("prepare", ["data", "prepare", "fashion-mnist", "--out", folder, "--per-class", str(o.per_class),
                               "--shard-size", "1000", *(["--source", o.source] if o.source else [])],
                   os.path.join(folder, "test.json"))
    _echo_command(prepare)
    run_steps([prepare], timings, os.cpu_count() or 1, log_dir)
    data = {"train": os.path.join(folder, "train.json"),
            "test": subset_manifest(os.path.join(folder, "test.json"), o.test_samples),
            "cache": os.path.join(o.folder, "cache.zarr")}

    teachers = {"conv": (CONV_TEACHER, "conv", ["--option", "small_input=true"]), "inv": (INV_TEACHER, "inv", [])}
    checkpoints = {name: os.path.join(o.folder, "teachers", f"{name}.safetensors") for name in teachers}
    recipe = [a for s in (*CNN_TEACHER_RECIPE, f"train.eval_every={o.teacher_epochs}",
                          "train.progress=false") for a in ("--set", s)]
    teacher_steps = {name: Step(f"teacher-{name}", ["teacher", "train", "--config", o.config, "--arch", arch,
                                                    "--kind", kind, *options, "--data", data["train"],
                                                    "--test-data", data["test"], "--epochs", str(o.teacher_epochs),
                                                    *recipe, "--out", checkpoints[name]], checkpoints[name],
                                checkpoints[name] + ".run/state.safetensors")
                     for name, (arch, kind, options) in teachers.items()}
    students = student_runs(o, data, views, checkpoints)
    cache = Step("cache", ["cache", "build", "--data", data["train"], "--config", o.config, "--views", str(views),
                           *[a for name, path in checkpoints.items() for a in ("--teacher", f"{name}={path}")],
                           "--threads", "1", "--workers", "0", "--no-progress", "--out", data["cache"]],
                 os.path.join(data["cache"], "zarr.json"))

    click.echo("\nteachers, and the no-KD student (it needs no teacher):", err=True)
    run_lanes([[teacher_steps["conv"], students["no_kd"]], [teacher_steps["inv"]]], timings, log_dir)
    click.echo("\nthe cache, then the student from it; beside them the same student with online teachers:", err=True)
    run_lanes([[cache, students["cached"]], [students["online"]]], timings, log_dir)
    return summarize_demo(o, data, checkpoints, {n: os.path.dirname(s.done) for n, s in students.items()}, timings)


# -----------------------------------------------------------------------------------------------------------------
# What the demo shows

def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _epochs(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_demo(o: DemoOptions, data: dict, checkpoints: dict, runs: dict[str, str], timings: Timings) -> dict:
    from shared.cache_schema import LogitCache
    from shared.checkpoint import read_meta
    from trainer.report import load_run
    from shared.manifest import Manifest
    test_size = Manifest.load(data["test"]).num_samples
    teachers = {}
    for name, path in checkpoints.items():
        meta = read_meta(path)
        teachers[name] = {"arch": meta.arch, "kind": meta.kind, "test_acc": meta.test_accuracy,
                          "seconds": timings.seconds.get(f"teacher-{name}")}
    attrs = LogitCache.open(data["cache"]).attrs
    per_view = attrs.num_samples * attrs.views
    cache = {"views": attrs.views, "samples": attrs.num_samples, "topk": attrs.topk, "bytes": _dir_bytes(data["cache"]),
             "bytes_per_view_per_teacher": {t.name: _dir_bytes(os.path.join(data["cache"], t.name)) / per_view
                                            for t in attrs.teachers},
             "seconds": timings.seconds.get("cache")}
    cache["bytes_per_view"] = cache["bytes"] / per_view
    students = {}
    for name, run in runs.items():
        final = load_run(run)["final"]
        students[name] = {"run": run, "seeds": 1, "acc_cls": final.get("test_acc_cls"),
                          "acc_mean": final.get("test_acc_mean"),
                          "seconds_per_epoch": statistics.median(e["seconds"] for e in _epochs(run)),
                          "cpu_seconds_per_epoch": statistics.median(e["cpu_seconds"] for e in _epochs(run))}
    return {"test_samples": test_size, "teachers": teachers, "cache": cache, "students": students,
            "plot": plot_curves(runs, os.path.join(o.folder, "students.png"))}


def plot_curves(runs: dict[str, str], out: str) -> str:
    """Training cross-entropy of the class head per epoch, and test accuracy per training CPU-second, of every
    student."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in runs.items():
        epochs = _epochs(run)
        x = [e["epoch"] + 1 for e in epochs]
        t = [sum(e["cpu_seconds"] for e in epochs[:i + 1]) for i in range(len(epochs))]
        line, = by_epoch.plot(x, [e["train_ce"] for e in epochs], marker=".", label=STUDENT_LABELS[name])
        tested = [(xi, ti, e["test_acc_cls"] * 100) for xi, ti, e in zip(x, t, epochs) if "test_acc_cls" in e]
        by_time.plot([p[1] for p in tested], [p[2] for p in tested], marker="o", color=line.get_color(),
                     label=STUDENT_LABELS[name])
    by_epoch.set(xlabel="epoch (= cached view)", ylabel="training cross-entropy, class head",
                 title="the same views, the same student")
    by_time.set(xlabel="training CPU-seconds (cumulative, one thread)", ylabel="test accuracy, class head (%)",
                title="what the cache saves")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


STUDENT_LABELS = {"cached": "CiT, cached teachers", "online": "CiT, online teachers", "no_kd": "no KD"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def print_summary(s: dict) -> None:
    n = s["test_samples"]
    c = s["cache"]
    lines = [f"\nTest accuracy on the first {n:,} Fashion-MNIST test images (measured once per model, after its "
             f"training; ± {100 * (0.25 / n) ** 0.5:.1f} points is the sampling error at this size):", ""]
    for name, t in s["teachers"].items():
        took = "" if t["seconds"] is None else f"   trained in {t['seconds']:.0f} s"
        lines.append(f"  teacher {name:<5} {t['arch']:<13} ({t['kind']}) {_pct(t['test_acc']):>6}{took}")
    per_teacher = ", ".join(f"{name} {b:.1f} B" for name, b in c["bytes_per_view_per_teacher"].items())
    built = "" if c["seconds"] is None else f", built in {c['seconds']:.0f} s"
    lines += ["", f"Cache: {c['samples']:,} images × {c['views']} views, top-{c['topk']} logits per teacher: "
                  f"{c['bytes'] / 1e6:.2f} MB on disk, {c['bytes_per_view']:.1f} B per view "
                  f"({per_teacher}; the rest is the views' params){built}.", "",
              "| student (cit_nano, 1 seed) | s / epoch | CPU-s / epoch | class head | mean of heads |",
              "|---|---|---|---|---|"]
    for name, r in s["students"].items():
        lines.append(f"| {STUDENT_LABELS[name]} | {r['seconds_per_epoch']:.1f} | {r['cpu_seconds_per_epoch']:.1f} | "
                     f"{_pct(r['acc_cls'])} | {_pct(r['acc_mean'])} |")
    cached, online = s["students"]["cached"], s["students"]["online"]
    lines += ["", "Per epoch: medians, each run on its own core (one thread). On the same views, the student from "
                  f"the cache takes {cached['cpu_seconds_per_epoch'] / online['cpu_seconds_per_epoch']:.2f}× the "
                  "CPU time of the same student with online teachers (CPU time: other jobs on the cores do not "
                  "change it much; wall seconds they do).",
              f"Curves: {s['plot']}",
              "One seed on a small test set: differences of a point or two are noise here. For the science (every "
              f"ablation, 3 seeds, the full test set) see {RESULTS_SECTION}."]
    click.echo("\n".join(lines))


@click.command()
@click.option("--folder", default="demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--config", default=os.path.join("configs", "demo.toml"), show_default=True)
@click.option("--per-class", default=100, show_default=True, help="Training images per class.")
@click.option("--test-samples", default=2000, show_default=True, help="Test images every accuracy is measured on.")
@click.option("--teacher-epochs", default=5, show_default=True)
@click.option("--epochs", type=int, default=None, help="Student epochs [the config's; also the cache's E].")
@click.option("--source", default=None, help="Fashion-MNIST IDX folder [cit data prepare's default].")
def demo(folder, config, per_class, test_samples, teacher_epochs, epochs, source):
    """Prepare data, train two teachers, cache them, train students from the cache and with online teachers."""
    summary = run_demo(DemoOptions(folder, config, per_class, test_samples, teacher_epochs, epochs, source))
    from trainer.engine import write_json
    write_json(os.path.join(folder, "summary.json"), summary)
    print_summary(summary)
