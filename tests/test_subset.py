"""Subsets: `cit data subset` writes a manifest of some rows of the same shards; a cache built on the full data serves
it (rows mapped by key, relation checked and recorded), one block read per piece."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shared.augment import ViewSpec
from shared.cache_schema import LogitCache
from shared.cli import data as data_cli
from shared.manifest import Manifest
from shared.subset import SubsetError, SubsetRule, choose_rows, shard_keys
from tests.shard_fixtures import make_shards
from tests.train_fixtures import build_cache
from trainer import train as train_mod

SPEC = ViewSpec(image_size=28, ra_magnitude_std=0.0)
VIEW_SEED, N = 5, 60
TINY_STUDENT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 32}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("subset")
    manifest = make_shards(str(root / "train"), num_samples=N, shard_size=20, seed=4, prefix="fu")
    other = make_shards(str(root / "other"), num_samples=20, shard_size=20, seed=6, prefix="ot")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    teacher = {"model": model, "kind": "conv", "mean": (0.4,), "std": (0.3,)}
    build_cache(str(root / "cache"), manifest, SPEC, VIEW_SEED, 2, {"t": teacher}, topk=4, chunk_rows=20)
    return {"root": root, "manifest": manifest.path, "other": other.path, "cache": str(root / "cache")}


def config(train: str, cache: str, *extra: str):
    sets = [f"data.train={json.dumps(train)}", f"data.cache={json.dumps(cache)}", f"data.view_seed={VIEW_SEED}",
            "augment.ra_magnitude_std=0.0", "data.num_workers=0", "train.epochs=1", "train.batch_size=8",
            "train.progress=false", 'kd.conv_teacher="t"', 'kd.inv_teacher=""',
            *(f"student.options.{k}={v}" for k, v in TINY_STUDENT.items()), *extra]
    return train_mod.load_run_config(None, sets)


def test_rules_are_pure_functions_of_labels_and_seed():
    labels = np.arange(40) % 4
    a = choose_rows(labels, SubsetRule(per_class=3, seed=1), 4)
    assert Counter(labels[a].tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert np.array_equal(a, choose_rows(labels, SubsetRule(per_class=3, seed=1), 4))
    assert not np.array_equal(a, choose_rows(labels, SubsetRule(per_class=3, seed=2), 4))
    assert len(choose_rows(labels, SubsetRule(fraction=0.25), 4)) == 10
    assert set(labels[choose_rows(labels, SubsetRule(classes=(1, 3)), 4)]) == {1, 3}
    with pytest.raises(SubsetError, match="class 0 has only 10 rows"):
        choose_rows(labels, SubsetRule(per_class=11), 4)
    with pytest.raises(SubsetError, match="exactly one of"):
        choose_rows(labels, SubsetRule(per_class=1, fraction=0.5), 4)


def test_per_class_subset_trains_from_the_full_cache_and_reads_only_its_rows(full, tmp_path):
    out = str(tmp_path / "sub" / "two.json")
    result = CliRunner().invoke(data_cli, ["subset", full["manifest"], "--per-class", "2", "--seed", "1",
                                           "--out", out])
    assert result.exit_code == 0, result.output
    sub, sup = Manifest.load(out), Manifest.load(full["manifest"])
    assert sub.num_samples == 20 and sub.fingerprint != sup.fingerprint
    assert sub.source["subset"]["of"] == sup.fingerprint
    p = train_mod.prepare(config(out, full["cache"]))
    ds = p.train_set
    keys_sup = [k for i in range(len(sup.shards)) for k in shard_keys(sup, i)]
    keys_sub = [k for i in range(len(sub.shards)) for k in shard_keys(sub, i)]
    assert [keys_sup[r] for r in ds.row_map] == keys_sub                  # mapped by key, independently
    cache = LogitCache.open(full["cache"])
    ds.set_epoch(1)
    batches = list(ds)                                                    # pixel digests checked on every row
    rows = [int(r) for b in batches for r in b.rows]
    assert sorted(rows) == list(range(20))
    assert Counter(int(y) for b in batches for y in b.labels) == {c: 2 for c in range(10)}
    assert ds.reads == len(ds.stream.pieces()) * 5                        # params, digests, a teacher's 3 arrays
    for b in batches:
        for j, r in enumerate(b.rows.tolist()):
            row = int(ds.row_map[r])
            np.testing.assert_array_equal(b.topk_logp[0, j].numpy(), cache.read_topk("t", 1, row, row + 1).logp[0])
    assert p.run_meta["cache_rows"] == {"relation": "subset", "cache_dataset": sup.fingerprint,
                                        "cache_manifest": sup.path, "rows": 20}
    run = train_mod.train(config(out, full["cache"]), str(tmp_path / "run"))
    assert len(run.history) == 1


def test_a_manifest_that_is_not_a_subset_is_refused_with_the_first_offending_key(full):
    cfg = config(full["other"], full["cache"], f"data.cache_data={json.dumps(full['manifest'])}")
    with pytest.raises(SubsetError, match="sample 'ot_000000' of shard .* is not a row of"):
        train_mod.prepare(cfg)


def test_subset_cli_refusals_are_one_line(full, tmp_path):
    runner = CliRunner()
    for args, message in [(["--fraction", "1.5"], "--fraction must be in (0, 1]"),
                          (["--per-class", "7"], "class 0 has only 6 rows"),
                          (["--classes", "a,b"], "must be comma-separated class ids"),
                          (["--per-class", "1", "--fraction", "0.5"], "exactly one of")]:
        r = runner.invoke(data_cli, ["subset", full["manifest"], *args, "--out", str(tmp_path / "s.json")])
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (args, r.output)
    r = runner.invoke(data_cli, ["subset", full["manifest"], "--per-class", "1", "--out", full["manifest"]])
    assert r.exit_code == 2 and "already exists" in r.output
