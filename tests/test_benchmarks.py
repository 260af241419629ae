"""The benchmarks do not rot: every script runs end to end in ``--quick`` mode and writes the fields the README's
results section reads (``benchmarks/render.py`` FIELDS); the committed results have those fields; and the README
section is exactly what ``render.py`` makes of the committed results.  Values are measured by the full runs, never
asserted here."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from render import FIELDS, RESULTS, get, missing_fields  # noqa: E402


def run_script(name: str, *args: str, monkeypatch, capsys) -> str:
    """``python benchmarks/<name> <args>``, run as ``__main__`` in this process (``runpy``): the script end to end,
    without a second interpreter importing torch and timm again (~6 CPU-s each).  Returns its stdout."""
    path = os.path.join(REPO, "benchmarks", name)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.setattr(sys, "path", list(sys.path))                  # the script's sys.path inserts stay its own
    threads = torch.get_num_threads()
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        out = capsys.readouterr()
        assert exc.code in (None, 0), f"{name} {' '.join(args)}: exit {exc.code}\n{out.out[-2000:]}\n{out.err[-4000:]}"
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_get_reads_dotted_paths_and_names_what_is_missing():
    data = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    assert get(data, "a.b.*.c") == [1, 2]
    with pytest.raises(KeyError, match="no 'x'"):
        get(data, "a.x")
    with pytest.raises(KeyError, match="non-empty list"):
        get({"a": []}, "a.*.c")


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_committed_results_have_the_fields_the_readme_reads(name):
    path = os.path.join(RESULTS, f"{name}.json")
    assert os.path.exists(path), f"{path} is missing: run its benchmark (see README, Measurements)"
    with open(path) as f:
        assert missing_fields(name, json.load(f)) == []


def test_readme_results_section_is_rendered_from_the_committed_results():
    proc = subprocess.run([sys.executable, "benchmarks/render.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, "README.md is stale: run python benchmarks/render.py\n" + proc.stderr


def test_render_rejects_a_result_without_a_field(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    data = json.loads((results / "cache.json").read_text())
    del data["throughput"]["ratio"]
    (results / "cache.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(REPO, "README.md"), readme)
    proc = subprocess.run([sys.executable, "benchmarks/render.py", "--results", str(results), "--readme", str(readme)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cache.json lacks: throughput.ratio" in proc.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for the accuracy benchmarks: bench_mixing reuses the data and teachers bench_claims trains."""
    return tmp_path_factory.mktemp("bench-work")


QUICK = [  # (script, result name in FIELDS or None, extra arguments); {fmnist}: the fake IDX files (tiny, no download)
    ("bench_claims.py", "claims", ["--workdir", "{work}", "--source", "{fmnist}"]),
    ("bench_mixing.py", "mixing", ["--workdir", "{work}", "--source", "{fmnist}"]),
    ("bench_families.py", "families", ["--workdir", "{work}", "--source", "{fmnist}"]),
    ("bench_recipes.py", "recipes", ["--workdir", "{work}", "--source", "{fmnist}"]),
    ("bench_loader.py", "loader", ["--data-dir", "{work}/loader", "--source", "{fmnist}"]),
    ("bench_models.py", "models_cpu", ["--clock", "cpu"]),
    ("bench_cache.py", "cache", []),
    ("bench_train.py", "train", []),
    ("bench_train.py", "train_join", ["--part", "join"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,name,extra", QUICK, ids=[q[1] for q in QUICK])
def test_quick_mode_writes_what_the_readme_reads(script, name, extra, workdir, fake_fashion_mnist, tmp_path,
                                                monkeypatch, capsys):
    out = tmp_path / f"{name}.json"
    run_script(script, "--quick", "--out", str(out),
               *[a.format(work=workdir, fmnist=fake_fashion_mnist.folder) for a in extra],
               monkeypatch=monkeypatch, capsys=capsys)
    data = json.loads(out.read_text())
    assert missing_fields(name, data) == []
    if name in ("claims", "mixing", "families", "recipes"):
        assert data["settings"]["quick"] is True and "--quick" in data["settings"]["command"]


@pytest.mark.parametrize("part", ["2/2", "x/2", "1"])
def test_claims_refuses_a_bad_part(part, tmp_path, monkeypatch, capsys):
    """In this process (the script's own main and argparse): no interpreter or torch start-up just to parse."""
    import bench_claims
    monkeypatch.setattr(sys, "argv", ["bench_claims.py", "--part", part, "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        bench_claims.main()
    assert exc.value.code == 2 and "--part" in capsys.readouterr().err and not any(tmp_path.iterdir())
