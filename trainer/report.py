"""``cit report``: the ablation table — runs grouped by variant, test accuracy as mean ± std over seeds.

A run is an output folder of ``cit train`` (its ``run.json``).  Runs that differ only in ``train.seed`` (and in
paths and logging options) form one variant.  Both inference outputs are reported and labelled: ``cls`` (class
head) and ``mean`` (mean of the heads, the official evaluation).
"""
from __future__ import annotations

import json
import os
import statistics

from shared.io import atomic_write_text
from trainer.engine import write_json

IGNORED = {("train", "seed"), ("train", "progress"), ("train", "log_interval"), ("train", "debug_rows"),
           ("train", "debug_kill_at_step"), ("train", "device"), ("data", "num_workers"), ("data", "train"),
           ("data", "test"), ("data", "cache"), ("kd", "checkpoints")}


def load_run(folder: str) -> dict:
    path = os.path.join(folder, "run.json")
    try:
        with open(path) as f:
            run = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a finished cit train run (no run.json)") from None
    run["folder"] = folder
    return run


def variant_label(config: dict) -> str:
    kd, student = config.get("kd", {}), config.get("student", {})
    if kd.get("mode") == "none":
        teachers = "no KD"
    else:
        teachers = f"conv={kd.get('conv_teacher') or '-'} inv={kd.get('inv_teacher') or '-'} ({kd.get('mode')})"
    extra = [" one token" if kd.get("shared_token") else "",
             f" tokens={student.get('token_mode')}" if student.get("token_mode") != "align" else ""]
    return f"{student.get('arch')} {teachers}{''.join(extra)}"


def variant_key(config: dict) -> str:
    kept = {s: {k: v for k, v in sec.items() if (s, k) not in IGNORED} for s, sec in config.items()}
    return json.dumps(kept, sort_keys=True)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarize(folders: list[str]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for folder in folders:
        run = load_run(folder)
        groups.setdefault(variant_key(run["config"]), []).append(run)
    rows = []
    for runs in groups.values():
        row = {"variant": variant_label(runs[0]["config"]), "seeds": [r["config"]["train"]["seed"] for r in runs],
               "runs": [r["folder"] for r in runs]}
        for output in ("cls", "mean"):
            values = [r["final"][f"test_acc_{output}"] for r in runs if f"test_acc_{output}" in r.get("final", {})]
            if values:
                row[f"acc_{output}"] = _stats(values)
        rows.append(row)
    return sorted(rows, key=lambda r: -r.get("acc_cls", {}).get("mean", -1))


def markdown(rows: list[dict]) -> str:
    def cell(stat):
        return f"{stat['mean'] * 100:.2f} ± {stat['std'] * 100:.2f}" if stat else "—"
    lines = ["| variant | seeds | top-1 class head (%) | top-1 mean of heads (%) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {cell(r.get('acc_cls'))} | {cell(r.get('acc_mean'))} |")
    return "\n".join(lines)


def report(folders: list[str], out: str | None = None, markdown_out: str | None = None) -> list[dict]:
    rows = summarize(folders)
    if out:
        write_json(out, {"rows": rows})
    if markdown_out:
        atomic_write_text(markdown_out, markdown(rows) + "\n")
    return rows
