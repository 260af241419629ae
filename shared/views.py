"""The view renderer both stages share: raw samples -> (uint8 view, params record, pixel digest) per view index.

``make_renderer(spec, seed, manifest)`` picks, once, a ``PlainRenderer`` or (``augment.mix = exact``) a
``MixedRenderer``; the cache builder, the trainer and ``cit cache verify --pixels`` all render through it, so they
compute the same bytes, and the digest the builder stores is taken of exactly what the renderer returns.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from shared.augment import PARAMS_LAYOUT_VERSION, ViewSpec, apply_view_array, eval_view, sample_view
from shared.reader import RawSample, decode_raw

# Bump when any change to the view code (sampling, ops, erasing, mixing, exact_math) changes a view's pixels.
RENDERER_VERSION = 2
DIGEST_NAME = "crc32"          # zlib.crc32 of the view's C-contiguous uint8 (C, H, W) bytes; 4 B per view
VIEW_CODE = {"params_layout": PARAMS_LAYOUT_VERSION, "renderer": RENDERER_VERSION, "digest": DIGEST_NAME}


def decode(raw: RawSample):
    return decode_raw(raw)


def pixel_digest(pixels: torch.Tensor | np.ndarray) -> int:
    """The stored per-view digest: crc32 of the uint8 pixels (chosen by measurement: benchmarks/bench_loader.py)."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    if array.dtype != np.uint8 or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=np.uint8)
    return zlib.crc32(array)


def view_digests(views: "list[RenderedView]") -> np.ndarray:
    """``pixel_digest`` of many rendered views (uint32): their arrays are uint8 and C-contiguous by construction,
    so each is one crc32 call (the trainer checks every view of every batch against the cache)."""
    return np.fromiter((zlib.crc32(v.array) for v in views), dtype=np.uint32, count=len(views))


@dataclass
class RenderedView:
    array: np.ndarray             # uint8 (C, H, W), C-contiguous: what the teacher sees and the student trains on
    params: np.ndarray            # float32 (P,): the params record
    partner_label: int = -1       # exact mixing: the partner's label (-1: not mixed)
    lam: float = 1.0              # exact mixing: weight of the sample's own view

    @property
    def pixels(self) -> torch.Tensor:
        """The same bytes as a tensor (no copy)."""
        return torch.from_numpy(self.array)

    @property
    def digest(self) -> int:
        return pixel_digest(self.array)


class LoadedRows:
    """The raw samples of some rows, plus what rendering reuses: decoded images (when ``keep_images``: the builder
    renders several views of a batch) and own views (exact mixing renders each row once per view, also as a
    partner).  Drop it when its rows are done."""

    def __init__(self, samples: list[RawSample], keep_images: bool = False):
        self.by_row = {s.row: s for s in samples}
        self._images: dict | None = {} if keep_images else None
        self.own: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def raw(self, row: int) -> RawSample:
        if row not in self.by_row:
            raise KeyError(f"row {row} (a mixing partner) was not loaded; load the rows the renderer asks for")
        return self.by_row[row]

    def image(self, row: int):
        if self._images is None:
            return decode(self.raw(row))
        if row not in self._images:
            self._images[row] = decode(self.raw(row))
        return self._images[row]


class PlainRenderer:
    """``sample_view`` + ``apply_view`` of the row itself."""

    def __init__(self, spec: ViewSpec, seed: int, manifest=None):
        self.spec, self.seed, self.manifest = spec, seed, manifest

    def rows_to_load(self, lo: int, hi: int) -> tuple[int, int]:
        """The rows a caller must load to render rows [lo, hi)."""
        return lo, hi

    def own_view(self, view: int, rows: LoadedRows, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The row's unmixed view (uint8 array) and its params record."""
        raw = rows.raw(row)
        params = sample_view(self.spec, self.seed, raw.key, view)
        return apply_view_array(self.spec, rows.image(row), params), params.encode(self.spec)

    def render(self, view: int, rows: LoadedRows, row: int) -> RenderedView:
        return RenderedView(*self.own_view(view, rows, row))


class MixedRenderer(PlainRenderer):
    """``exact`` mixing: the row's own view mixed with its partner's (``shared.mixing``); the record carries both
    parts.  Needs the manifest (pairing windows follow shard boundaries)."""

    def __init__(self, spec: ViewSpec, seed: int, manifest):
        if manifest is None:
            raise ValueError("exact mixing needs the manifest to pair rows")
        super().__init__(spec, seed, manifest)

    def rows_to_load(self, lo: int, hi: int) -> tuple[int, int]:
        from shared.mixing import rows_with_partners
        return rows_with_partners(self.manifest, lo, hi, self.spec.mix_window)

    def _own(self, view: int, rows: LoadedRows, row: int) -> tuple[np.ndarray, np.ndarray]:
        if (view, row) not in rows.own:
            rows.own[(view, row)] = self.own_view(view, rows, row)
        return rows.own[(view, row)]

    def render(self, view: int, rows: LoadedRows, row: int) -> RenderedView:
        from shared.mixing import mix_arrays, partner_of, sample_mix
        raw = rows.raw(row)
        partner = partner_of(self.manifest, row, self.spec.mix_window, self.seed, view)
        mix = sample_mix(self.spec, self.seed, raw.key, view, row, partner)
        pixels, record = self._own(view, rows, row)
        if mix.kind:
            pixels = mix_arrays(pixels, self._own(view, rows, partner)[0], mix)
        full = np.concatenate([record, mix.encode()])
        partner_label = rows.raw(mix.partner).label if mix.kind else raw.label
        return RenderedView(pixels, full, partner_label, mix.lam)


def view_mismatch(view: int, raw, rendered: RenderedView, params: np.ndarray, digest: int) -> str | None:
    """The one-line reason a replayed view is not the one the cache's teachers saw, or None when it is.
    On the loader's hot path: two byte comparisons and one crc32 when the view matches."""
    def where() -> str:
        return (f"view {view} of sample {raw.key!r} (row {raw.row}, shard {raw.shard_url}) differs from the view "
                "the cache's teachers saw")
    if rendered.params.tobytes() != np.asarray(params, np.float32).tobytes():     # bit for bit
        return (f"{where()}: params check failed (replayed {rendered.params.tolist()} vs cached "
                f"{np.asarray(params).tolist()}); the augmentation code or its inputs changed since the cache was "
                "built")
    got = pixel_digest(rendered.array)
    if got != int(digest):
        return (f"{where()}: pixels check failed (crc32 {got:08x} vs cached {int(digest):08x}); likely the shard "
                "changed after the build, or another Pillow/numpy renders differently (`cit cache info` shows the "
                "build's versions)")
    return None


def make_renderer(spec: ViewSpec, seed: int, manifest=None) -> PlainRenderer:
    """The renderer for ``spec``: the one place that decides whether views are mixed."""
    return MixedRenderer(spec, seed, manifest) if spec.mixes_views else PlainRenderer(spec, seed, manifest)


def render_view(spec: ViewSpec, seed: int, view: int, raw: RawSample) -> tuple[torch.Tensor, np.ndarray]:
    """The unmixed uint8 view tensor and its params record for view ``view`` of ``raw``."""
    array, record = PlainRenderer(spec, seed).own_view(view, LoadedRows([raw]), raw.row)
    return torch.from_numpy(array), record


def render_eval(spec: ViewSpec, raw: RawSample) -> torch.Tensor:
    return eval_view(spec, decode(raw))


def render_mixed(spec: ViewSpec, seed: int, view: int, manifest, samples: list[RawSample],
                 rows: range) -> dict[int, tuple[torch.Tensor, np.ndarray, int, float]]:
    """Exact-mode views of ``rows``: {row: (mixed uint8 view, params record incl. mix, partner label, λ)}.
    ``samples`` must hold every row of the pairing windows around ``rows`` (``MixedRenderer.rows_to_load``)."""
    renderer, loaded = MixedRenderer(spec, seed, manifest), LoadedRows(samples)
    out = {}
    for row in rows:
        r = renderer.render(view, loaded, row)
        out[row] = (r.pixels, r.params, r.partner_label, r.lam)
    return out
