"""The whole test suite, run once as a user runs it: wall seconds, CPU seconds (user + sys of pytest and every
process it starts), tests passed, the load average before and after, and the 10 slowest tests.

    .venv/bin/python benchmarks/bench_suite.py [--out benchmarks/results/suite.json] [-- extra pytest arguments]

Run it on idle cores for the number the README states: other jobs on the machine stretch the wall time (the CPU
time much less), and the JSON records the load so a reader can tell.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shared.io import atomic_write_text  # noqa: E402  (not benchmarks.common: this process need not start torch)

DURATION = re.compile(r"^\s*([0-9.]+)s (call|setup|teardown)\s+(\S+)")
OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def run_suite(extra: list[str]) -> dict:
    """``python -m pytest -q --durations=10`` in the repository; its own CPU time and that of all its children."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=10", "-p", "no:cacheprovider", *extra]
    env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""))
    load_start = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)    # rusage of pytest + every process it waited for (workers, CLIs)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    outcomes = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in OUTCOME.findall(tail)}
    failed = [line.split(" ", 2)[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    slowest = [{"seconds": float(m.group(1)), "phase": m.group(2), "test": m.group(3)}
               for m in map(DURATION.match, output.splitlines()) if m][:10]
    return {"command": " ".join(["python", "-m", "pytest", "-q", *extra]), "exit_code": code,
            "wall_seconds": round(wall, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "user_seconds": round(usage.ru_utime, 1), "sys_seconds": round(usage.ru_stime, 1),
            "passed": outcomes.get("passed", 0), "outcomes": outcomes, "summary": tail, "failed": failed,
            "slowest": slowest,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "usable_cpus": len(os.sched_getaffinity(0)), "loadavg_start": list(load_start),
                        "loadavg_end": list(os.getloadavg())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "suite.json"))
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    result = {"benchmark": "suite", **run_suite(args.pytest_args)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    la = result["machine"]["loadavg_start"][0], result["machine"]["loadavg_end"][0]
    for nodeid in result["failed"]:
        print(f"FAILED {nodeid}")
    print(f"{result['summary']}\nwall {result['wall_seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s "
          f"(user + sys), load average {la[0]:.1f} at start, {la[1]:.1f} at the end -> {args.out}")
    sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()
