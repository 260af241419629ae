"""Streaming reader over manifest-listed shards: the first stage of both stages' data pipelines.

Each epoch, shards are put in an order drawn from (seed, epoch); the concatenated row stream is cut into
``world * workers`` contiguous, equal (±1) ranges, one per consumer (rank × DataLoader worker).  A consumer reads
only the shards its range touches, so every sample is read exactly once per epoch, ranks stay balanced for DDP,
and more consumers than shards simply means consumers share a shard (no hang, no duplicates).  Inside each
*piece* (a consumer's slice of one shard) samples are permuted with (seed, epoch, shard).  A piece's rows are
contiguous, which lets the cache join fetch one block per piece instead of one Zarr call per sample.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from shared.manifest import Manifest
from shared.shards import ShardError, decode_image, image_field, iter_shard, read_label


@dataclass
class Piece:
    shard: int     # shard index in the manifest
    lo: int        # first row (global) of the piece
    hi: int        # one past the last row


@dataclass
class RawSample:
    key: str
    row: int
    label: int
    data: dict          # the sample's raw fields (bytes), e.g. {"png": ...}
    shard_url: str
    piece: Piece | None
    channels: int | None = None   # the manifest's channel count: every image is decoded to it


def decode_raw(raw: RawSample):
    """The sample's image as a PIL image of the manifest's channel count (mode L or RGB): the decode of every stage."""
    return decode_image(raw.data[image_field(raw.data)], raw.shard_url, raw.key, raw.channels)


def distributed_context(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world): explicit values, else torch.distributed if initialised, else torchrun's env, else (0, 1)."""
    if rank is not None and world is not None:
        return rank, world
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)]


def consumer_pieces(manifest: Manifest, order: list[int], consumer: int, consumers: int) -> list[Piece]:
    """The pieces of the epoch stream (shards in ``order``) that consumer ``consumer`` of ``consumers`` owns."""
    total = manifest.num_samples
    begin, end = consumer * total // consumers, (consumer + 1) * total // consumers
    pieces, position = [], 0
    for index in order:
        shard = manifest.shards[index]
        lo, hi = max(begin, position), min(end, position + shard.samples)
        if lo < hi:
            offset = shard.start - position
            pieces.append(Piece(index, lo + offset, hi + offset))
        position += shard.samples
    return pieces


def pieces_for_rows(manifest: Manifest, lo: int, hi: int) -> list[Piece]:
    """The pieces (in manifest order) that hold rows [lo, hi) — how the cache builder reads one row chunk."""
    pieces = []
    for index, shard in enumerate(manifest.shards):
        a, b = max(lo, shard.start), min(hi, shard.stop)
        if a < b:
            pieces.append(Piece(index, a, b))
    return pieces


def read_piece(manifest: Manifest, piece: Piece) -> list[RawSample]:
    """The samples of one piece in shard order (skipping keys the manifest marks as skipped)."""
    shard = manifest.shards[piece.shard]
    url = manifest.shard_url(piece.shard)
    skipped = manifest.skipped_keys(shard.url)
    samples, row = [], shard.start
    for sample in iter_shard(url):
        key = sample["__key__"]
        if key in skipped:
            continue
        if row >= piece.hi:
            if piece.hi == shard.stop:   # one sample past the shard's end costs nothing and catches a lowered count
                raise ShardError(f"shard {url} has more samples than manifest {manifest.path} says "
                                 f"({shard.samples}); the manifest was edited or belongs to other shards: rescan")
            break
        if row >= piece.lo:
            label = read_label(sample, url)
            if not 0 <= label < manifest.num_classes:
                raise ShardError(f"sample {key!r} in shard {url} has cls={label}, outside 0..{manifest.num_classes - 1}")
            samples.append(RawSample(key, row, label, sample, url, piece, manifest.channels))
        row += 1
    if row < piece.hi:
        raise ShardError(f"shard {url} has fewer samples than the manifest says ({row - shard.start} < "
                         f"{shard.samples}); rebuild the manifest")
    return samples


class ShardStream(IterableDataset):
    """Yields ``RawSample`` for this rank and DataLoader worker; call ``set_epoch`` before each epoch."""

    def __init__(self, manifest: Manifest, seed: int = 0, shuffle: bool = True,
                 rank: int | None = None, world: int | None = None):
        self.manifest, self.seed, self.shuffle = manifest, seed, shuffle
        self.rank, self.world = distributed_context(rank, world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def pieces(self) -> list[Piece]:
        order = shard_order(len(self.manifest.shards), self.seed, self.epoch, self.shuffle)
        return consumer_pieces(self.manifest, order, *self.consumer())

    def rows_per_rank(self) -> list[int]:
        total = self.manifest.num_samples
        return [(r + 1) * total // self.world - r * total // self.world for r in range(self.world)]

    def permute(self, samples: list[RawSample], piece: Piece) -> list[RawSample]:
        """A piece's samples in this epoch's order: permuted by (seed, epoch, shard) when shuffling."""
        if not self.shuffle:
            return samples
        rng = np.random.default_rng([self.seed, self.epoch, piece.shard, 0x5EED])
        return [samples[i] for i in rng.permutation(len(samples))]

    def __iter__(self) -> Iterator[RawSample]:
        for piece in self.pieces():
            yield from self.permute(read_piece(self.manifest, piece), piece)


def seed_worker(_: int) -> None:
    """DataLoader worker_init_fn: one intra-op thread per worker (workers are the parallelism)."""
    torch.set_num_threads(1)
