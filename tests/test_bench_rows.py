"""The family and recipe benchmarks' rows are valid run configs, and their findings are computed on paired seeds
(synthetic run records: no training here)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_families  # noqa: E402
import bench_recipes  # noqa: E402
from lowdata import paired  # noqa: E402


@pytest.mark.parametrize("module", [bench_families, bench_recipes], ids=["families", "recipes"])
@pytest.mark.parametrize("quick", [False, True])
def test_every_row_is_a_run_config_the_trainer_accepts(module, quick):
    from trainer.config import load_run_config
    rows = module.variants(quick)
    assert len({v.name for v in rows}) == len(rows)
    for v in rows:
        cfg = load_run_config(os.path.join(REPO, "configs", "ablation", f"{v.config}.toml"), list(v.sets))
        assert (cfg.kd.mode == "none") == (v.cache == ""), v.name


def test_recipe_rows_set_what_their_names_say():
    from trainer.config import load_run_config
    cfg = {v.name: load_run_config(os.path.join(REPO, "configs", "ablation", f"{v.config}.toml"), list(v.sets))
           for v in bench_recipes.VARIANTS}
    assert [cfg[f"tau{t}"].loss.tau1 for t in (1, 2, 4)] == [1.0, 2.0, 4.0]
    assert all(cfg[f"tau{t}"].loss.tau2 == cfg[f"tau{t}"].loss.tau1 for t in (1, 2, 4))
    assert (cfg["linear"].objective.schedule, cfg["cosine"].objective.schedule) == ("linear", "cosine")
    assert (cfg["kd"].objective.recipe, cfg["hard"].objective.recipe, cfg["tau1"].objective.recipe) == \
        ("kd", "hard", "cit")


def _runs(acc: dict[str, list[float]], kl: dict[str, list[float]] | None = None) -> dict:
    return {name: [{"seed": s, "acc_cls": a} | ({f"kl_{t}": kl[name][s] for t in ("regnet", "rednet")}
                                                if kl and name in kl else {})
                   for s, a in enumerate(values)] for name, values in acc.items()}


def test_findings_pair_seeds_and_say_what_does_not_separate():
    base = [0.60, 0.62, 0.64]                      # seed effects shared by every row of a family
    acc = {}
    for fam, gain in (("resnet", 0.01), ("mixer", 0.00), ("vit", 0.05)):
        acc |= {f"{fam}-no_kd": base, f"{fam}-conv": [b + gain / 2 for b in base],
                f"{fam}-inv": [b + gain / 4 for b in base], f"{fam}-cit": [b + gain + 0.001 * s
                                                                          for s, b in enumerate(base)]}
    kl = {"mixer-cit": [0.50, 0.52, 0.49], "resnet-cit": [0.30, 0.31, 0.29], "vit-cit": [0.49, 0.53, 0.50]}
    f = bench_families.findings(_runs(acc, kl))
    vit_res = f["transformer_gains_most"]["vit_minus_resnet_over_no_kd"]
    assert vit_res["mean"] == pytest.approx(0.04) and vit_res["n"] == 3 and vit_res["verdict"] == "holds"
    assert f["gains"]["vit"]["over_best_single"]["mean"] == pytest.approx(0.026)
    assert f["mixer_farthest"]["mixer_minus_resnet_kl_regnet"]["verdict"] == "holds"
    assert f["mixer_farthest"]["mixer_minus_vit_kl_rednet"]["verdict"] == "within seed spread"


def test_paired_uses_only_the_seeds_both_rows_ran():
    runs = _runs({"a": [0.7, 0.8, 0.9], "b": [0.6, 0.7]})
    d = paired(runs, "a", "b")
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.1) and d["std"] == pytest.approx(0.0, abs=1e-12)
    assert bench_recipes.verdict(paired(_runs({"a": [0.7], "b": [0.6]}), "a", "b")) == "one seed: not decided"
