"""``cit demo`` end to end on the fake Fashion-MNIST files, at one teacher epoch and two student epochs: every
step runs as the ``cit`` command it prints, the summary has what the README promises, and a rerun reuses it all."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from shared.cli import main as cit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(folder, source):
    """``cit demo`` through the real entry point, in this process (its steps are ``cit`` subprocesses either way:
    a second interpreter for the demo itself would only import torch again)."""
    args = ["demo", "--folder", str(folder), "--source", source, "--per-class", "5", "--test-samples", "50",
            "--teacher-epochs", "1", "--epochs", "2"]
    return CliRunner().invoke(cit, args)


@pytest.mark.slow
def test_demo_tells_the_story_and_reuses_its_work(fake_fashion_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)                                   # the default --config is relative, as for a user
    monkeypatch.setenv("PYTHONPATH", REPO)                    # the steps' subprocesses run this checkout
    folder = tmp_path / "demo"
    proc = run_demo(folder, fake_fashion_mnist.folder)
    assert proc.exit_code == 0, proc.stdout[-2000:] + proc.stderr[-4000:] + repr(proc.exception)
    out, err = proc.stdout, proc.stderr
    # the commands, printed before they run; the two lanes side by side
    assert "$ cit data prepare fashion-mnist" in err and "[core 1] $ cit teacher train" in err
    assert "[core 2] $ cit train" in err and "--kd online" in err and "$ cit cache build" in err
    assert "--test-data" not in err.split("$ cit cache build")[1].split("\n")[0]   # accuracy measured once
    s = json.loads((folder / "summary.json").read_text())
    assert s["test_samples"] == 50 and "first 50 Fashion-MNIST test images" in out
    assert set(s["teachers"]) == {"conv", "inv"} and all(0 <= t["test_acc"] <= 1 for t in s["teachers"].values())
    c = s["cache"]
    assert (c["samples"], c["views"]) == (50, 2) and c["seconds"] > 0
    assert c["bytes_per_view"] > sum(c["bytes_per_view_per_teacher"].values()) > 0   # + the params record
    assert "Cache: 50 images × 2 views" in out
    assert set(s["students"]) == {"cached", "online", "no_kd"}
    for name, r in s["students"].items():
        assert r["seeds"] == 1 and r["seconds_per_epoch"] > 0 and 0 <= r["acc_cls"] <= 1
    assert "1 seed" in out and "± 0.00" not in out and "README.md" in out
    assert open(s["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a rerun runs nothing and reports the same
    again = run_demo(folder, fake_fashion_mnist.folder)
    assert again.exit_code == 0, again.stderr[-3000:]
    assert again.stderr.count("(done before: reused)") == 7 and " done in " not in again.stderr
    assert json.loads((folder / "summary.json").read_text())["students"] == s["students"]
