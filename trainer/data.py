"""Stage 2's data path: shard stream -> replayed view of this epoch -> joined with its cached teacher logits.

Epoch t uses view v = t mod E.  ``ShardStream`` hands each DataLoader worker contiguous *pieces* (rows [lo, hi) of
one shard) whose samples arrive together, so the join reads one block per piece, view and teacher (one Zarr
call per array) and serves the piece's samples from it — never one Zarr call per sample.  With
``verify_views`` (the default) each replayed view's params record and pixel digest are compared with the ones
the cache builder stored, so a replay that drifted from what the teacher saw (a shard changed after the build,
another Pillow/numpy) fails loudly instead of silently training on mismatched logits.

Views stay uint8 until they reach the device (4x less to pin and copy); normalisation happens there.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from shared.augment import ViewSpec
from shared.errors import CitUserError
from shared.cache_schema import CacheAttrs, CacheError, LogitCache, TopK
from shared.manifest import Manifest
from shared.reader import Piece, ShardStream, read_piece, seed_worker
from shared.views import VIEW_CODE, LoadedRows, make_renderer, render_eval, view_mismatch


@dataclass
class DataConfig:
    """``[data]``: where the samples and the cache are, and how views are chosen."""
    train: str = ""                   # training manifest
    test: str = ""                    # test manifest: evaluated after every epoch when set
    cache: str = ""                   # logit cache URL (kd.mode = cached)
    cache_data: str = ""              # manifest the cache was built for, when data.train is a subset of it
                                      #   (default: the one a `cit data subset` manifest records)
    view_seed: int = 0                # augmentation seed; must equal the cache's
    views: int = 0                    # E; 0 = the cache's E, or without a cache a fresh view every epoch
    allow_repeat_views: bool = False  # train more epochs than views (later epochs replay earlier views)
    num_workers: int = 2
    shuffle: bool = True
    verify_views: bool = True         # check each replayed view's params and pixel digest against the cache's
    verify_shards: bool = True        # at start, check each shard's sha256 (existence and size always)


class DataError(CitUserError):
    """The data, the cache and the training options do not fit together; the message says how."""


def view_index(epoch: int, views: int) -> int:
    """The view epoch ``epoch`` trains on: ``epoch mod E`` (E = 0: every epoch a fresh view)."""
    return epoch % views if views > 0 else epoch


# -----------------------------------------------------------------------------------------------------------------
# Checks done before training starts

def check_cache(attrs: CacheAttrs, manifest: Manifest, spec: ViewSpec, view_seed: int, teachers: list[str],
                num_classes: int, url: str = "") -> None:
    """Raise ``CacheError`` listing *every* way the cache does not fit this training run."""
    problems = []
    if attrs.dataset_fingerprint != manifest.fingerprint:
        problems.append(f"it was built for dataset {attrs.dataset_fingerprint[:12]}… but the training manifest "
                        f"{manifest.path} is {manifest.fingerprint[:12]}… (cache from other shards?)")
    if attrs.num_samples != manifest.num_samples:
        problems.append(f"it has {attrs.num_samples} rows, the manifest {manifest.num_samples}")
    if attrs.num_classes != num_classes:
        problems.append(f"it has {attrs.num_classes} classes, the student {num_classes}")
    if attrs.seed != view_seed:
        problems.append(f"its augmentation seed is {attrs.seed}, data.view_seed is {view_seed}")
    mine, theirs = spec.view_identity(), ViewSpec.from_dict(attrs.augment).view_identity()
    differ = [f"{k}: cache {theirs.get(k)!r} vs config {mine.get(k)!r}"
              for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        problems.append("its augmentation spec differs (" + "; ".join(differ) + ")")
    if attrs.view_code != VIEW_CODE:
        problems.append(f"its views were rendered by view code {attrs.view_code or 'of an older cit'}, this cit "
                        f"renders {VIEW_CODE} (rebuild the cache with `cit cache build ... --force`)")
    names = [t.name for t in attrs.teachers]
    for name in teachers:
        if name not in names:
            problems.append(f"teacher {name!r} is not in it (it has {names})")
        elif attrs.teacher(name).num_classes != num_classes:
            problems.append(f"teacher {name!r} has {attrs.teacher(name).num_classes} classes, the student "
                            f"{num_classes}")
    if problems:
        raise CacheError(f"cache {url or '?'} does not match this training run: " + "; ".join(problems))


def warn_provenance(attrs: CacheAttrs, url: str, verify: bool) -> None:
    """Say once what differs between the cache's build environment and this one; the digests decide the rest."""
    from shared import provenance
    if not attrs.provenance:      # written by a tool that records none (tests, synthetic benchmarks)
        return
    diff = provenance.differences(attrs.provenance, provenance.collect())
    if not diff:
        return
    then = ("every replayed view's pixel digest is checked, so a view that renders differently here stops the run"
            if verify else "data.verify_views is off: replayed pixels are NOT checked against the cache")
    warnings.warn(f"cache {url} was built in another environment ({'; '.join(diff)}); {then}", stacklevel=2)


def check_views(epochs: int, views: int, allow_repeat: bool) -> None:
    """More epochs than views means the student sees the same view (and teacher output) again: the 'fixed
    teacher' regime that overfits.  Refuse unless allowed, then only warn."""
    if views > 0 and epochs > views:
        message = (f"{epochs} epochs but only E={views} views: epochs {views}..{epochs - 1} replay views "
                   f"(epoch t uses view t mod {views})")
        if not allow_repeat:
            raise DataError(message + "; build the cache with more views or pass --allow-repeat-views "
                            "(data.allow_repeat_views=true)")
        warnings.warn(message, stacklevel=2)


# -----------------------------------------------------------------------------------------------------------------
# Samples and batches

@dataclass
class Sample:
    view: torch.Tensor                   # uint8 (C, H, W)
    label: int
    row: int
    topk: list[TopK] = field(default_factory=list)   # one per teacher: logp (K,), indices (K,), tail (S,)
    partner_label: int = -1              # exact mixup/cutmix: the partner's label (-1: not mixed)
    lam: float = 1.0                     # exact mixup/cutmix: weight of the sample's own view


@dataclass
class Batch:
    views: torch.Tensor                  # uint8 (B, C, H, W)
    labels: torch.Tensor                 # int64 (B,)
    rows: torch.Tensor                   # int64 (B,)
    topk_logp: torch.Tensor | None = None      # float16 (T, B, K): top-k log-probabilities
    topk_indices: torch.Tensor | None = None   # int (T, B, K), narrow dtype until on the device
    topk_tail: torch.Tensor | None = None      # float16 (T, B, S): tail log-mass at each cached temperature
    partner_labels: torch.Tensor | None = None  # int64 (B,): set when the batch is mixed (exact or approx)
    lam: torch.Tensor | None = None             # float32 (B,): weight of each sample's own view
    partner_index: torch.Tensor | None = None   # int64 (B,): approx mode, the batch position mixed in

    def __len__(self) -> int:
        return self.labels.shape[0]

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin thread (pin_memory=True)."""
        return Batch(*(t.pin_memory() if t is not None else None for t in self._tensors()))

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None for t in self._tensors()))

    def _tensors(self):
        return (self.views, self.labels, self.rows, self.topk_logp, self.topk_indices, self.topk_tail,
                self.partner_labels, self.lam, self.partner_index)

    def targets(self, teachers: list[str]) -> dict[str, tuple]:
        """Teacher name -> cached (logp, indices, tail), the form ``CiTLoss`` builds its targets from."""
        if self.topk_logp is None:
            return {}
        return {name: (self.topk_logp[i], self.topk_indices[i], self.topk_tail[i]) for i, name in enumerate(teachers)}


def collate(samples: list[Sample]) -> Batch:
    views = torch.stack([s.view for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    rows = torch.tensor([s.row for s in samples], dtype=torch.int64)
    batch = Batch(views, labels, rows, *_collate_topk(samples))
    if any(s.partner_label >= 0 for s in samples):      # exact mode: mixing happened when the view was made
        batch.partner_labels = torch.tensor([s.partner_label if s.partner_label >= 0 else s.label
                                             for s in samples], dtype=torch.int64)
        batch.lam = torch.tensor([s.lam for s in samples], dtype=torch.float32)
    return batch


@dataclass
class ApproxMixCollate:
    """``augment.mix = approx``: collate, then mix the batch with itself reversed (timm's Mixup), in the loader.

    The mixed views are rounded back to uint8 (they stay small through pinning and transfer, and online teachers
    see exactly the student's pixels); the cached teacher distributions are mixed with the same λ in the loss
    (``partner_index``).  The draws are seeded by (view seed, the batch's first rows), so a resumed run mixes the
    same batches the same way."""
    spec: ViewSpec
    seed: int

    def __call__(self, samples: list[Sample]) -> Batch:
        from shared.mixing import batch_mix
        batch = collate(samples)
        rng = np.random.default_rng([self.seed, *batch.rows[:2].tolist(), 0x313])
        mixed, lam, partner = batch_mix(batch.views.float(), rng, self.spec)
        batch.views = mixed.round_().clamp_(0, 255).to(torch.uint8)
        batch.partner_labels = batch.labels[partner]
        batch.lam = torch.full((len(batch),), float(lam), dtype=torch.float32)
        batch.partner_index = partner
        return batch


def _collate_topk(samples: list[Sample]) -> tuple:
    if not samples[0].topk:
        return ()
    teachers = range(len(samples[0].topk))
    logp = np.stack([np.stack([s.topk[t].logp for s in samples]) for t in teachers])
    indices = np.stack([np.stack([s.topk[t].indices for s in samples]) for t in teachers])
    tail = np.stack([np.stack([s.topk[t].tail for s in samples]) for t in teachers])
    if indices.dtype == np.uint16 or indices.dtype == np.uint32:   # torch lacks some unsigned types
        indices = indices.astype(np.int64)
    return torch.from_numpy(logp), torch.from_numpy(indices), torch.from_numpy(tail)


# -----------------------------------------------------------------------------------------------------------------
# Datasets

@dataclass
class _Block:
    """One piece's rows for the current view: params records, pixel digests and each teacher's top-k."""
    piece: Piece
    params: np.ndarray | None
    digests: np.ndarray | None
    topk: list[TopK]


class TrainViews(IterableDataset):
    """This rank's (and DataLoader worker's) samples of one epoch: replayed view + label + cached top-k."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, view_seed: int, views: int, *, seed: int = 0,
                 shuffle: bool = True, cache_url: str = "", teachers: tuple[str, ...] = (), verify: bool = True,
                 rank: int | None = None, world: int | None = None, row_map: np.ndarray | None = None):
        self.stream = ShardStream(manifest, seed=seed, shuffle=shuffle, rank=rank, world=world)
        self.row_map = row_map  # cache row of each training row (a subset of the cache's rows); None: the same rows
        self.spec, self.view_seed, self.views = spec, view_seed, views
        self.cache_url, self.teachers, self.verify = cache_url, list(teachers), verify and bool(cache_url)
        self._cache: LogitCache | None = None
        self.collate_fn = ApproxMixCollate(spec, view_seed) if spec.mix == "approx" else collate
        self.renderer = make_renderer(spec, view_seed, manifest)
        self.reads = 0          # Zarr block reads by this process (tests assert one per piece and array)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    @property
    def view(self) -> int:
        return view_index(self.epoch, self.views)

    def cache(self) -> LogitCache:
        if self._cache is None:   # opened lazily, i.e. inside each worker process
            self._cache = LogitCache.open(self.cache_url)
        return self._cache

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None    # every worker opens its own handle
        return state

    def _fetch(self, piece: Piece) -> _Block:
        cache = self.cache()
        lo, hi, take = piece.lo, piece.hi, None
        if self.row_map is not None:   # a subset: one read of the block covering the piece's (increasing) cache rows
            rows = self.row_map[piece.lo:piece.hi]
            lo, hi, take = int(rows[0]), int(rows[-1]) + 1, rows - rows[0]
        params = cache.read_params(self.view, lo, hi) if self.verify else None
        digests = cache.read_digests(self.view, lo, hi) if self.verify else None
        topk = [cache.read_topk(name, self.view, lo, hi) for name in self.teachers]
        self.reads += len(topk) + 2 * (params is not None)
        if take is not None:
            params, digests = (None, None) if params is None else (params[take], digests[take])
            topk = [TopK(t.logp[take], t.indices[take], t.tail[take]) for t in topk]
        return _Block(piece, params, digests, topk)

    def _rendered(self) -> Iterator[tuple]:
        """(raw sample, its piece, rendered view) in this consumer's epoch order."""
        manifest = self.stream.manifest
        for piece in self.stream.pieces():
            # with exact mixing: plus the pairing windows around the piece (windows never cross shards)
            lo, hi = self.renderer.rows_to_load(piece.lo, piece.hi)
            samples = read_piece(manifest, Piece(piece.shard, lo, hi))
            rows = LoadedRows(samples)
            own = [s for s in samples if piece.lo <= s.row < piece.hi]
            for raw in self.stream.permute(own, piece):
                yield raw, piece, self.renderer.render(self.view, rows, raw.row)

    def __iter__(self) -> Iterator[Sample]:
        block: _Block | None = None
        join = bool(self.cache_url) and (bool(self.teachers) or self.verify)
        for raw, piece, rendered in self._rendered():
            topk = []
            if join:
                if block is None or block.piece != piece:
                    block = self._fetch(piece)
                i = raw.row - piece.lo
                if block.params is not None:
                    problem = view_mismatch(self.view, raw, rendered, block.params[i], block.digests[i])
                    if problem:
                        raise DataError(problem)
                topk = [TopK(t.logp[i], t.indices[i], t.tail[i]) for t in block.topk]
            yield Sample(rendered.pixels, raw.label, raw.row, topk, rendered.partner_label, rendered.lam)

    def num_batches(self, batch_size: int, num_workers: int, rank: int | None = None) -> int:
        """Batches rank ``rank``'s DataLoader yields per epoch (each worker ends with its own partial batch)."""
        consumers = max(num_workers, 1)
        total, world = self.stream.manifest.num_samples, self.stream.world * consumers
        rank = self.stream.rank if rank is None else rank
        count = 0
        for w in range(consumers):
            c = rank * consumers + w
            rows = (c + 1) * total // world - c * total // world
            count += -(-rows // batch_size)
        return count

    def rows_this_rank(self) -> int:
        return self.stream.rows_per_rank()[self.stream.rank]


class EvalViews(IterableDataset):
    """The deterministic evaluation view of every sample of this rank's share of a (test) manifest."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, rank: int | None = None, world: int | None = None):
        self.stream = ShardStream(manifest, shuffle=False, rank=rank, world=world)
        self.spec = spec

    def __iter__(self) -> Iterator[Sample]:
        for raw in self.stream:
            yield Sample(render_eval(self.spec, raw), raw.label, raw.row)


def make_loader(dataset: IterableDataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """Workers are not persistent: each epoch's iterator picks up the dataset's new epoch.  A dataset may bring
    its own ``collate_fn`` (approx mixing does)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=getattr(dataset, "collate_fn", collate),
                      pin_memory=pin_memory, worker_init_fn=seed_worker if num_workers else None,
                      prefetch_factor=4 if num_workers else None)
