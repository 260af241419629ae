"""Streaming reader: every row exactly once per epoch, per-epoch shuffling, rank/worker splits."""
import json
import os
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader

from shared.manifest import Manifest, ShardInfo
from shared.reader import ShardStream, consumer_pieces, shard_order
from tests.shard_fixtures import make_shards

N = 70


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(str(folder), num_samples=N, shard_size=16)   # 5 shards: 16,16,16,16,6
    return Manifest.load(str(folder / "s.json"))


def rows_of(stream, workers: int, epoch: int = 0) -> list[int]:
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda s: s.row)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2, 7])   # 7 workers > 5 shards: no hang, no duplicates
def test_every_row_once(manifest, workers):
    rows = rows_of(ShardStream(manifest, seed=1, rank=0, world=1), workers)
    assert sorted(rows) == list(range(N))


def test_epochs_shuffle_differently_and_reproducibly(manifest):
    stream = ShardStream(manifest, seed=1, rank=0, world=1)
    e0, e1 = rows_of(stream, 2, 0), rows_of(stream, 2, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert rows_of(stream, 2, 0) == e0


def test_rows_match_keys_and_labels(manifest):
    for sample in ShardStream(manifest, seed=0, rank=0, world=1):
        assert sample.key == f"s_{sample.row:06d}" and sample.label == sample.row % 10
        assert sample.piece.lo <= sample.row < sample.piece.hi


def test_ranks_split_disjoint_complete_and_balanced(manifest):
    per_rank = [rows_of(ShardStream(manifest, seed=4, rank=r, world=3), 2, 5) for r in range(3)]
    flat = [row for rows in per_rank for row in rows]
    assert sorted(flat) == list(range(N))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_pieces_cover_stream_exactly(manifest):
    for consumers in (1, 2, 3, 8, 100):
        order = shard_order(len(manifest.shards), 0, 3, True)
        covered = []
        for c in range(consumers):
            for piece in consumer_pieces(manifest, order, c, consumers):
                shard = manifest.shards[piece.shard]
                assert shard.start <= piece.lo < piece.hi <= shard.stop
                covered += range(piece.lo, piece.hi)
        assert sorted(covered) == list(range(N))


def test_skipped_keys_are_not_read(manifest, tmp_path):
    shards = [ShardInfo(s.url, s.samples - (i == 0), s.sha256, size=s.size) for i, s in enumerate(manifest.shards)]
    skipped = [{"shard": manifest.shards[0].url, "key": "s_000003", "reason": "test"}]
    path = os.path.join(os.path.dirname(manifest.path), "skip.json")
    Manifest(shards, manifest.num_classes, manifest.class_names, skipped=skipped, channels=1).save(path)
    keys = [s.key for s in ShardStream(Manifest.load(path), rank=0, world=1)]
    assert "s_000003" not in keys and len(keys) == N - 1


TORCHRUN_SCRIPT = """
import json, sys
import torch.distributed as dist
from shared.manifest import Manifest
from shared.reader import ShardStream
dist.init_process_group("gloo")
stream = ShardStream(Manifest.load(sys.argv[1]), seed=2)
stream.set_epoch(1)
rows = [s.row for s in stream]
with open(sys.argv[2] + f".{dist.get_rank()}", "w") as f:
    json.dump(rows, f)
dist.destroy_process_group()
"""


def test_torchrun_two_processes_split_rows(manifest, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "rows"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--standalone", str(script), manifest.path, str(out)], check=True, env=env,
                   capture_output=True, timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rows.{r}").read_text()) for r in (0, 1))
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(N))
