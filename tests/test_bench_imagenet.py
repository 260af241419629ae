"""benchmarks/bench_imagenet.py --quick runs end to end as a script (as ``__main__``, in this process) and writes a consistent result JSON (the
numbers themselves are measured by the full run, never asserted here)."""
from __future__ import annotations

import json
import math
import pytest

from tests.test_benchmarks import run_script


@pytest.mark.slow
def test_bench_imagenet_quick(tmp_path, monkeypatch, capsys):
    out = tmp_path / "imagenet.json"
    stdout = run_script("bench_imagenet.py", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work"),
                        monkeypatch=monkeypatch, capsys=capsys)
    assert "Projection, ImageNet-1k" in stdout
    r = json.loads(out.read_text())

    assert r["benchmark"] == "imagenet" and r["quick"] is True
    assert {"platform", "cpus", "torch", "loadavg_start", "loadavg_end"} <= set(r["machine"])
    assert "--quick" in r["settings"]["command"]

    data = r["dataset"]
    assert data["samples"] == r["settings"]["images"] and data["shards"] >= 2
    assert 30e3 < data["bytes_mean"] < 300e3 and 200 <= data["side_min"] <= data["side_max"] <= 500

    loader = r["loader"]
    assert loader["images_per_cpu_second_per_core"] > 0
    us = loader["breakdown"]["cpu_us_per_image"]
    stages = ("read", "decode", "sample_view", "apply_view", "check")
    assert all(us[s] > 0 for s in stages)
    assert math.isclose(us["total"], sum(us[s] for s in stages), rel_tol=1e-3)
    assert [run["workers"] for run in loader["dataloader"]] == [0, 1, 2]
    for run in loader["dataloader"]:
        assert run["images"] == data["samples"] and run["images_per_cpu_second"] > 0

    bpv = r["bytes_per_view"]
    assert set(bpv) == {"1", "5", "10", "20"}
    assert 0 < bpv["1"] < bpv["5"] < bpv["10"] < bpv["20"]
    for k, detail in r["bytes"]["by_k"].items():
        assert detail["bytes_per_view_per_teacher"] < detail["raw_record_bytes"]   # compression helps

    p = r["projection"]
    assert p["images"] == 1_281_167 and p["views"] == 300 and p["teachers"] == 2
    assert p["total_views"] == 1_281_167 * 300
    k10 = p["storage_by_k"]["10"]
    expected = bpv["10"] * p["total_views"] * 2 + p["params_bytes_per_view"] * p["total_views"]
    assert math.isclose(k10["total_bytes"], expected, rel_tol=1e-9)
    assert 0 < p["params_bytes_per_view"] < 4 * r["bytes"]["params_per_view"]   # compressed float32 record
    assert math.isclose(p["loader_core_hours_per_pass"],
                        p["total_views"] / loader["images_per_cpu_second_per_core"] / 3600, rel_tol=1e-9)
    assert p["teacher_gpu_hours_total"] > 0 and p["cores_to_feed_gpu"] > 0
    assert all(t["flops_per_image"] > 0 and t["params"] > 0 for t in p["teacher_models"].values())
    assert p["assumptions"] and set(p["assumed_gpu_images_per_s"]) == {"conv", "inv"}
