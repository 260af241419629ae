"""The demo's wall time, as a new user meets it: ``cit demo`` from an empty folder, ``--runs`` times in a row.

Each run gets a fresh folder, so nothing is reused; its wall time, the CPU time of its whole process tree, the load
average around it and the demo's own summary (teachers, cache, students, per-step timings) go to the JSON.  The
README quotes these runs' wall times (goal: at most 4 minutes on 2 idle cores).

    python benchmarks/bench_demo.py --runs 2                        # the README's numbers (~4 min a run)
    python benchmarks/bench_demo.py --quick --source FOLDER         # smoke run on small (fake) IDX files
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--per-class", "5", "--test-samples", "50", "--teacher-epochs", "1", "--epochs", "2"]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(folder: str, extra: list[str]) -> dict:
    """One ``cit demo`` in ``folder`` (removed first); its output is kept beside it for a reader."""
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "shared.cli", "demo", "--folder", folder, *extra]
    load, cpu, started = os.getloadavg(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": REPO})
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu
    with open(folder + ".log", "w") as f:
        f.write(proc.stderr + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"cit demo failed (exit {proc.returncode}); its output: {folder}.log")
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    print(f"  demo run: {wall:.0f} s wall, {cpu:.0f} CPU-s (load {load[0]:.1f} before)", flush=True)
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "loadavg_start": list(load),
            "loadavg_end": list(os.getloadavg()), "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one tiny run (5 images per class, 1 teacher epoch)")
    ap.add_argument("--source", help="Fashion-MNIST IDX folder [cit data prepare's default]")
    ap.add_argument("--workdir", help="where the demo folders go [a temporary folder, removed after]")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "demo.json"))
    args = ap.parse_args()
    extra = (QUICK if args.quick else []) + (["--source", args.source] if args.source else [])
    runs = 1 if args.quick else args.runs
    work = args.workdir or tempfile.mkdtemp(prefix="cit-demo-")
    try:
        results = [run_once(os.path.join(work, f"demo{i}"), extra) for i in range(runs)]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from common import command, write_result
    walls = [r["wall_seconds"] for r in results]
    write_result(args.out, {"benchmark": "demo", "settings": {"quick": args.quick, "runs": runs,
                                                              "cpus": len(os.sched_getaffinity(0)),
                                                              "command": command()},
                            "wall_seconds": walls, "wall_seconds_max": max(walls), "runs": results})
    print(f"demo wall time: {', '.join(f'{w:.0f} s' for w in walls)} -> {args.out}")


if __name__ == "__main__":
    main()
