"""Stage 2's data path: shard stream -> replayed view of this epoch -> joined with its cached teacher logits.

Epoch t uses view v = t mod E.  ``ShardStream`` hands each DataLoader worker contiguous *pieces* (rows [lo, hi) of
one shard) whose samples arrive together, so the join reads one block per piece, view and teacher (one Zarr
call per array) and serves the piece's samples from it — never one Zarr call per sample.  With feature KD the
same block read carries the teachers' pooled-feature codes; they are decoded on the device (``Batch``).  With
``verify_views`` (the default) each replayed view's params record and pixel digest are compared with the ones
the cache builder stored, so a replay that drifted from what the teacher saw (a shard changed after the build,
another Pillow/numpy) fails loudly instead of silently training on mismatched logits.

Views stay uint8 until they reach the device (4x less to pin and copy); normalisation happens there.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from shared.augment import ViewSpec
from shared.errors import CitUserError
from shared.cache_schema import FEATURE_ARRAYS, TEACHER_ARRAYS, CacheAttrs, CacheError, LogitCache
from shared.manifest import Manifest
from shared.reader import Piece, RawSample, ShardStream, read_piece, seed_worker
from shared.views import VIEW_CODE, LoadedRows, RenderedView, make_renderer, render_eval, view_digests, \
    view_mismatch
from trainer.losses import CachedTargets


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
    """One evaluation sample (the training path builds whole batches instead: ``TrainViews``)."""
    view: torch.Tensor                   # uint8 (C, H, W)
    label: int
    row: int


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
    features: torch.Tensor | None = None        # uint8 (B, ΣD): the teachers' pooled-feature codes side by side
    feature_scale: torch.Tensor | None = None   # float32 (T, B, 2): their per-view (lo, step)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin thread (pin_memory=True)."""
        return Batch(*(t.pin_memory() if t is not None else None for t in self._tensors()))

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None for t in self._tensors()))

    def _tensors(self):
        return (self.views, self.labels, self.rows, self.topk_logp, self.topk_indices, self.topk_tail,
                self.partner_labels, self.lam, self.partner_index, self.features, self.feature_scale)

    def targets(self, teachers: list[str]) -> CachedTargets | dict:
        """Teacher name -> cached (logp, indices, tail), the form ``CiTLoss`` builds its targets from (stacked as
        loaded: ``CachedTargets``)."""
        if self.topk_logp is None:
            return {}
        return CachedTargets(teachers, self.topk_logp, self.topk_indices, self.topk_tail)

    def teacher_features(self, teachers: list[str], dims: list[int]) -> dict[str, torch.Tensor]:
        """Teacher name -> float32 (B, D) pooled features, decoded where the batch is (on the device)."""
        from shared.features import decode_features
        out, start = {}, 0
        for i, (name, dim) in enumerate(zip(teachers, dims)):
            out[name] = decode_features(self.features[:, start:start + dim], self.feature_scale[i])
            start += dim
        return out

    @classmethod
    def cat(cls, batches: list["Batch"]) -> "Batch":
        """Batches joined end to end (tests and tools that want a whole epoch as one batch)."""
        def join(tensors, dim):
            return None if tensors[0] is None else torch.cat(tensors, dim=dim)
        fields = list(zip(*(b._tensors() for b in batches)))
        dims = (0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1)
        if batches[0].partner_index is not None:    # positions are per batch: shift them
            offsets = np.cumsum([0] + [len(b) for b in batches[:-1]])
            fields[8] = tuple(b.partner_index + int(o) for b, o in zip(batches, offsets))
        return cls(*(join(list(f), d) for f, d in zip(fields, dims)))


def collate(samples: list[Sample]) -> Batch:
    views = torch.stack([s.view for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    rows = torch.tensor([s.row for s in samples], dtype=torch.int64)
    return Batch(views, labels, rows)


@dataclass
class ApproxMix:
    """``augment.mix = approx``: mix the batch with itself reversed (timm's Mixup), in the loader.

    The mixed views are rounded back to uint8 (they stay small through pinning and transfer, and online teachers
    see exactly the student's pixels); the cached teacher distributions are mixed with the same λ in the loss
    (``partner_index``).  The draws are seeded by (view seed, the batch's first rows), so a resumed run mixes the
    same batches the same way."""
    spec: ViewSpec
    seed: int

    def __call__(self, batch: Batch) -> Batch:
        from shared.mixing import batch_mix
        rng = np.random.default_rng([self.seed, *batch.rows[:2].tolist(), 0x313])
        mixed, lam, partner = batch_mix(batch.views.float(), rng, self.spec)
        batch.views = mixed.round_().clamp_(0, 255).to(torch.uint8)
        batch.partner_labels = batch.labels[partner]
        batch.lam = torch.full((len(batch),), float(lam), dtype=torch.float32)
        batch.partner_index = partner
        return batch


# -----------------------------------------------------------------------------------------------------------------
# The join: one indexed read per batch from the piece's block

@dataclass
class Block:
    """One piece's rows for the current view, as read from the cache: params records and pixel digests (when
    verifying) and every teacher's top-k stacked over teachers, so a batch's rows are one fancy index away."""
    piece: Piece
    params: np.ndarray | None     # float32 (n, P)
    digests: np.ndarray | None    # uint32 (n,)
    logp: np.ndarray | None       # float16 (T, n, K)
    indices: np.ndarray | None    # int (T, n, K)
    tail: np.ndarray | None       # float16 (T, n, S)
    features: np.ndarray | None = None        # uint8 (n, ΣD): pooled-feature codes of every teacher, side by side
    feature_scale: np.ndarray | None = None   # float32 (T, n, 2)


@dataclass
class Rendered:
    """The stream's item: a raw sample, the piece it came from and its replayed view."""
    raw: RawSample
    piece: Piece
    view: RenderedView


def read_block(cache: LogitCache, view: int, piece: Piece, teachers: list[str], verify: bool,
               row_map: np.ndarray | None = None, features: bool = False) -> Block:
    """The whole piece's rows of every array the join needs, in one concurrent read (one Zarr call per array).
    ``row_map`` (a training manifest that is a subset of the cache's): the piece's cache rows are read as the one
    block that covers them, then taken.  ``features``: the teachers' pooled features too."""
    paths = (["params", "digest"] if verify else []) + [f"{t}/{a}" for t in teachers for a in TEACHER_ARRAYS]
    if features:
        paths += [f"{t}/{a}" for t in teachers for a in FEATURE_ARRAYS]
    if row_map is None:
        arrays = cache.read_rows(paths, view, piece.lo, piece.hi)
    else:
        rows = np.asarray(row_map[piece.lo:piece.hi])
        lo = int(rows.min())
        arrays = [a[rows - lo] for a in cache.read_rows(paths, view, lo, int(rows.max()) + 1)]
    params, digests = (arrays[0], arrays[1]) if verify else (None, None)
    first = 2 if verify else 0
    tops, feats = arrays[first:first + 3 * len(teachers)], arrays[first + 3 * len(teachers):]
    if not teachers:
        return Block(piece, params, digests, None, None, None)
    indices = np.stack(tops[1::3])
    if indices.dtype in (np.uint16, np.uint32):    # torch lacks some unsigned types
        indices = indices.astype(np.int64)
    block = Block(piece, params, digests, np.stack(tops[0::3]), indices, np.stack(tops[2::3]))
    if features:
        block.features, block.feature_scale = np.concatenate(feats[0::2], axis=1), np.stack(feats[1::2])
    return block


def check_views_match(view: int, items: list[Rendered], params: np.ndarray, digests: np.ndarray) -> None:
    """The batch's replayed params records and pixel digests against the cached ones: one array comparison each
    (bit for bit), plus one crc32 per view; the first mismatching row is explained by ``view_mismatch``."""
    views = [it.view for it in items]
    replayed = np.stack([v.params for v in views]).astype(np.float32, copy=False)
    got = view_digests(views)
    cached = np.ascontiguousarray(params, dtype=np.float32)
    bad_params = (replayed.view(np.uint32) != cached.view(np.uint32)).any(axis=1) \
        if replayed.shape == cached.shape else np.ones(len(items), bool)
    bad = np.flatnonzero(bad_params | (got != np.asarray(digests, np.uint32)))
    if bad.size:
        i = int(bad[0])
        problem = view_mismatch(view, items[i].raw, items[i].view, params[i], int(digests[i]))
        raise DataError(problem or f"view {view} of row {items[i].raw.row} does not match the cache")


def _runs(items: list[Rendered]) -> Iterator[tuple[Piece, int, int]]:
    """(piece, start, stop) of the batch's consecutive items from one piece (a batch spans at most a few).  Pieces
    are compared by identity (the stream hands out one object per piece): an equal copy would only start a new
    run, which finds the block it needs already held."""
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i].piece is not items[start].piece:
            yield items[start].piece, start, i
            start = i


class CacheJoin:
    """The batch's cached fields, gathered per piece block with one indexed read per array, checked against the
    replayed views when ``verify``.  Holds the current piece's block (a piece's rows arrive together)."""

    def __init__(self, open_cache, teachers: list[str], verify: bool, row_map: np.ndarray | None = None,
                 features: bool = False):
        self.open_cache, self.teachers, self.verify = open_cache, teachers, verify
        self.features = features and bool(teachers)   # the teachers' pooled features too
        self.row_map = row_map  # cache row of each training row (a subset of the cache's rows); None: the same rows
        self.block: Block | None = None
        self.block_view = -1
        self.reads = 0          # Zarr block reads (tests assert one per piece and array)

    def _block(self, view: int, piece: Piece) -> Block:
        if self.block is None or self.block.piece != piece or self.block_view != view:
            block = read_block(self.open_cache(), view, piece, self.teachers, self.verify, self.row_map,
                               self.features)
            self.block, self.block_view = block, view
            self.reads += (3 + 2 * self.features) * len(self.teachers) + 2 * self.verify
        return self.block

    def __call__(self, view: int, items: list[Rendered], batch: Batch) -> Batch:
        parts, feats = [], []
        for piece, a, b in _runs(items):
            block = self._block(view, piece)
            idx = np.fromiter((it.raw.row - piece.lo for it in items[a:b]), dtype=np.int64, count=b - a)
            if self.verify:
                check_views_match(view, items[a:b], block.params[idx], block.digests[idx])
            if self.teachers:
                parts.append((block.logp[:, idx], block.indices[:, idx], block.tail[:, idx]))
            if self.features:
                feats.append((block.features[idx], block.feature_scale[:, idx]))
        if parts:
            logp, indices, tail = (p[0] if len(parts) == 1 else np.concatenate(p, axis=1) for p in zip(*parts))
            batch.topk_logp, batch.topk_indices, batch.topk_tail = (torch.from_numpy(x) for x in (logp, indices, tail))
        if feats:
            codes, scale = (p[0] if len(feats) == 1 else np.concatenate(p, axis=d) for p, d in zip(zip(*feats), (0, 1)))
            batch.features, batch.feature_scale = torch.from_numpy(codes), torch.from_numpy(scale)
        return batch


def assemble(items: list[Rendered]) -> Batch:
    """Views copied once into the batch's uint8 buffer; labels, rows and the exact-mixing fields as arrays."""
    first = items[0].view.array
    views = np.empty((len(items), *first.shape), dtype=np.uint8)
    for j, it in enumerate(items):
        views[j] = it.view.array
    labels = np.fromiter((it.raw.label for it in items), dtype=np.int64, count=len(items))
    rows = np.fromiter((it.raw.row for it in items), dtype=np.int64, count=len(items))
    batch = Batch(torch.from_numpy(views), torch.from_numpy(labels), torch.from_numpy(rows))
    if any(it.view.partner_label >= 0 for it in items):      # exact mode: mixing happened when the view was made
        partner = np.fromiter((it.view.partner_label if it.view.partner_label >= 0 else it.raw.label
                               for it in items), dtype=np.int64, count=len(items))
        batch.partner_labels = torch.from_numpy(partner)
        batch.lam = torch.from_numpy(np.fromiter((it.view.lam for it in items), dtype=np.float32, count=len(items)))
    return batch


def grouped(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items; the last one may be shorter."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# -----------------------------------------------------------------------------------------------------------------
# Datasets

class TrainViews(IterableDataset):
    """This rank's (and DataLoader worker's) batches of one epoch: replayed views + labels + cached top-k.

    The stages: shard stream -> render (``_rendered``) -> group into batches -> assemble -> cache join ->
    approx mixing.  Iterating yields ``Batch`` es of ``batch_size`` rows (each worker ends with its own partial
    batch); ``make_loader`` sets ``batch_size`` to the loader's."""

    def __init__(self, manifest: Manifest, spec: ViewSpec, view_seed: int, views: int, *, seed: int = 0,
                 shuffle: bool = True, cache_url: str = "", teachers: tuple[str, ...] = (), verify: bool = True,
                 rank: int | None = None, world: int | None = None, batch_size: int = 64,
                 row_map: np.ndarray | None = None, features: bool = False):
        self.stream = ShardStream(manifest, seed=seed, shuffle=shuffle, rank=rank, world=world)
        self.row_map = row_map  # cache row of each training row (a subset of the cache's rows); None: the same rows
        self.spec, self.view_seed, self.views = spec, view_seed, views
        self.cache_url, self.teachers, self.verify = cache_url, list(teachers), verify and bool(cache_url)
        self.batch_size = batch_size
        self._cache: LogitCache | None = None
        self.mix = ApproxMix(spec, view_seed) if spec.mix == "approx" else None
        self.renderer = make_renderer(spec, view_seed, manifest)
        self.join = CacheJoin(self.cache, self.teachers, self.verify, row_map, features) \
            if cache_url and (self.teachers or self.verify) else None

    @property
    def reads(self) -> int:
        return self.join.reads if self.join else 0

    @reads.setter
    def reads(self, value: int) -> None:
        if self.join:
            self.join.reads = value

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

    def _rendered(self) -> Iterator[Rendered]:
        """Every sample of this consumer's epoch, rendered, in epoch order."""
        manifest = self.stream.manifest
        for piece in self.stream.pieces():
            # with exact mixing: plus the pairing windows around the piece (windows never cross shards)
            lo, hi = self.renderer.rows_to_load(piece.lo, piece.hi)
            samples = read_piece(manifest, Piece(piece.shard, lo, hi))
            rows = LoadedRows(samples)
            own = [s for s in samples if piece.lo <= s.row < piece.hi]
            for raw in self.stream.permute(own, piece):
                yield Rendered(raw, piece, self.renderer.render(self.view, rows, raw.row))

    def __iter__(self) -> Iterator[Batch]:
        view = self.view
        for items in grouped(self._rendered(), self.batch_size):
            batch = assemble(items)
            if self.join is not None:
                batch = self.join(view, items, batch)
            if self.mix is not None:
                batch = self.mix(batch)
            yield batch
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
    """Workers are not persistent: each epoch's iterator picks up the dataset's new epoch.  ``TrainViews`` builds
    whole batches itself (the cache join is per batch), so its loader only moves them; other datasets yield
    samples that ``collate`` stacks."""
    batched = isinstance(dataset, TrainViews)
    if batched:
        dataset.batch_size = batch_size
    return DataLoader(dataset, batch_size=None if batched else batch_size, num_workers=num_workers,
                      collate_fn=_as_is if batched else collate,
                      pin_memory=pin_memory, worker_init_fn=seed_worker if num_workers else None,
                      prefetch_factor=4 if num_workers else None)


def _as_is(batch: Batch) -> Batch:
    return batch
