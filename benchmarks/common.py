"""What the accuracy benchmarks share: low-data Fashion-MNIST, trained (and reused) teachers, a timed cache build,
one student run, and the machine record every JSON carries.

Each step is idempotent inside a work folder, so an interrupted benchmark reruns only what is missing.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from shared.io import atomic_write_text  # noqa: E402  (shared first: it sets the OpenMP wait policy)
from shared.manifest import Manifest  # noqa: E402

import torch  # noqa: E402

LOWDATA_CONFIG = os.path.join(ROOT, "configs", "fmnist_lowdata.toml")


@dataclass(frozen=True)
class Teacher:
    """A teacher to train for a benchmark: cache name, timm/registry arch, kind, create_model options."""
    name: str
    arch: str
    kind: str
    options: dict = field(default_factory=dict)


def machine(load_start: tuple[float, float, float]) -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}


def command() -> str:
    """The command line that produced a result, relative to the repository."""
    return " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def accuracy_arguments(ap, name: str, epochs: int) -> None:
    """The options the accuracy benchmarks share (defaults in brackets: full run; quick run)."""
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", f"{name}.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 images per class, 1 epoch, 1 seed, 100 test "
                    "images, tiny students (< 1 min)")
    ap.add_argument("--seeds", type=int, help="student seeds per variant [3; quick 1]")
    ap.add_argument("--per-class", type=int, help="training images per class [100; quick 5]")
    ap.add_argument("--epochs", type=int, help=f"student epochs = cached views E [{epochs}; quick 1]")
    ap.add_argument("--teacher-epochs", type=int, help="[40; quick 1]")
    ap.add_argument("--test-samples", type=int, help="test images, 0 = all 10k [0; quick 100]")
    ap.add_argument("--source", default=None, help="Fashion-MNIST IDX folder [cit data prepare's default]")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--workdir", default="/tmp/cit-claims", help="data, teachers, caches and runs (reused)")


def parse_part(ap, args) -> None:
    """``--part I/N`` (train the runs i with i % N == I) into ``args.part_index`` and ``args.parts``."""
    try:
        args.part_index, args.parts = map(int, args.part.split("/"))
    except ValueError:
        ap.error(f"--part takes I/N with integers, got {args.part!r}")
    if not 0 <= args.part_index < args.parts:
        ap.error(f"--part {args.part}: I must be in 0 .. N-1")


def fill_defaults(args, defaults: dict[str, tuple]) -> None:
    """Options left unset take their (full, quick) default, by ``args.quick``."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict, variants) -> dict:
    """Mean ± sample std over seeds of both inference outputs, per variant (``name, group, label, config, sets``)."""
    summary = {}
    for v in variants:
        rs = runs.get(v.name, [])
        if not rs:
            continue
        c = mean_std([r["acc_cls"] for r in rs])
        m = mean_std([r["acc_mean"] if r["acc_mean"] is not None else r["acc_cls"] for r in rs])
        summary[v.name] = {"group": v.group, "label": v.label, "config": f"configs/ablation/{v.config}.toml",
                           "sets": list(v.sets), "seeds": len(rs), "acc_cls_mean": c[0], "acc_cls_std": c[1],
                           "acc_mean_heads_mean": m[0], "acc_mean_heads_std": m[1],
                           "train_seconds_mean": sum(r["seconds"] for r in rs) / len(rs)}
    return summary


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def prepare_fmnist(work: str, per_class: int, test_samples: int = 0, corruptions: bool = False,
                   source: str | None = None, shard_size: int = 500) -> tuple[str, str]:
    """(train manifest, test manifest) of Fashion-MNIST with ``per_class`` training images per class; the test set
    is the full 10k, or its first ``test_samples`` (whole shards); corrupted test sets (severity 3) under
    ``<work>/data/corrupt``."""
    from shared.prepare import DEFAULT_FASHION_MNIST, prepare_fashion_mnist
    from trainer.demo import subset_manifest
    data = os.path.join(work, "data")
    train_json, test_json = os.path.join(data, "train.json"), os.path.join(data, "test.json")
    if not os.path.exists(train_json):     # what `cit data prepare fashion-mnist` runs, in this process
        prepare_fashion_mnist(source or DEFAULT_FASHION_MNIST, data, shard_size, per_class, corruptions=corruptions,
                              severities=(3,), workers=1)
    return train_json, (subset_manifest(test_json, test_samples) if test_samples else test_json)


def base_sets(train_json: str, test_json: str, workers: int = 1) -> list[str]:
    """Overrides every benchmark run shares: its data, view seed 0, CPU, no progress bar."""
    return [f"data.train={json.dumps(train_json)}", f"data.test={json.dumps(test_json)}",
            f"data.num_workers={workers}", "data.view_seed=0", "train.progress=false", 'train.device="cpu"']


def train_teachers(work: str, teachers: list[Teacher], train_json: str, test_json: str, epochs: int,
                   config: str = LOWDATA_CONFIG) -> dict:
    """Train each teacher once (reused when its checkpoint exists) with ``CNN_TEACHER_RECIPE``."""
    from trainer.teacher import CNN_TEACHER_RECIPE, TeacherSpec, train_teacher
    from trainer.train import load_run_config
    out = {}
    for t in teachers:
        path = os.path.join(work, "teachers", f"{t.name}-e{epochs}.safetensors")
        started = time.perf_counter()
        reused = os.path.exists(path)
        if not reused:
            cfg = load_run_config(config, base_sets(train_json, test_json) + [
                f"train.epochs={epochs}", f"train.eval_every={max(epochs, 1)}", *CNN_TEACHER_RECIPE])
            train_teacher(TeacherSpec(t.arch, t.kind, train_json, test_json, path, dict(t.options)), cfg,
                          resume=os.path.exists(path + ".run/state.safetensors"))   # continue a killed run
        out[t.name] = {"arch": t.arch, "kind": t.kind, "options": dict(t.options), "path": path, "epochs": epochs,
                       "test_acc": teacher_accuracy(path), "reused": reused,
                       "seconds": round(time.perf_counter() - started, 1)}
        print(f"teacher {t.name} ({t.arch}): test acc {out[t.name]['test_acc']:.4f}"
              f"{' (reused)' if reused else ''}", flush=True)
    return out


def teacher_accuracy(path: str) -> float:
    """The final test accuracy a teacher checkpoint records (``cit teacher train`` evaluates after its last epoch)."""
    from shared.checkpoint import read_meta
    acc = read_meta(path).get("test_accuracy")
    if acc is None:
        raise ValueError(f"{path} records no test accuracy")
    return float(acc)


def build_timed(out: str, train_json: str, teachers: dict, spec, views: int, topk: int, **build_options) -> dict:
    """Build a cache from scratch (the build time is part of a measurement) and describe it; ``build_options``:
    further ``build_cache`` keywords (``temperatures=(1, 2, 4)``, ...), recorded in the description."""
    from cache_builder.build import build_cache
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = build_cache(train_json, [(n, t["path"]) for n, t in teachers.items()], out, views=views, topk=topk,
                          spec=spec, seed=0, workers=0, progress=False, device="cpu",
                          **build_options)
    wall = time.perf_counter() - started
    rows = Manifest.load(train_json).num_samples
    size = dir_bytes(out)
    print(f"cache {os.path.basename(out)}: {wall:.1f} s, {size / 1e6:.2f} MB", flush=True)
    return {"url": out, "views": views, "topk": topk, **build_options, "build_seconds_wall": round(wall, 2),
            "build_seconds_units": round(summary.build_seconds, 2), "bytes": size,
            "bytes_per_view_per_teacher": round(size / (rows * views * len(teachers)), 2),
            "views_per_second": round(summary.steady_views_per_second, 1)}


def schedule_sets(args, seed: int) -> list[str]:
    """A student run's schedule: E epochs (= views), one evaluation at the end, a smaller student when quick."""
    sets = [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", f"train.seed={seed}",
            "train.warmup_epochs=" + ("0" if args.quick else "3")]
    if args.quick:
        sets += ["student.options.embed_dim=32", "student.options.depth=1", "student.options.num_heads=2"]
    return sets


def run_student(out: str, config: str, sets: list[str]) -> dict:
    """Train one student (reused when ``<out>/run.json`` exists) and return its final-epoch record."""
    from trainer.train import load_run_config, train
    done = os.path.join(out, "run.json")
    if not os.path.exists(done):
        shutil.rmtree(out, ignore_errors=True)
        train(load_run_config(config, sets), out)
    with open(done) as f:
        run = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    last = run["final"]
    return {"acc_cls": last["test_acc_cls"], "acc_mean": last.get("test_acc_mean"), "train_loss": last["train_loss"],
            "seconds": round(sum(e["seconds"] for e in epochs), 1), "samples_per_s": last.get("samples_per_s"),
            "checkpoint": os.path.join(out, "student.safetensors")}
