"""One stage both pipelines share: raw sample -> (augmented view, params record) for a given view index."""
from __future__ import annotations

import numpy as np
import torch

from shared.augment import ViewSpec, apply_view, eval_view, sample_view
from shared.reader import RawSample, decode_raw


def decode(raw: RawSample):
    return decode_raw(raw)


def render_view(spec: ViewSpec, seed: int, view: int, raw: RawSample) -> tuple[torch.Tensor, np.ndarray]:
    """The uint8 view tensor and its float32 params record for view ``view`` of ``raw``."""
    params = sample_view(spec, seed, raw.key, view)
    return apply_view(spec, decode(raw), params), params.encode(spec)


def render_eval(spec: ViewSpec, raw: RawSample) -> torch.Tensor:
    return eval_view(spec, decode(raw))


def render_mixed(spec: ViewSpec, seed: int, view: int, manifest, samples: list[RawSample],
                 rows: range) -> dict[int, tuple[torch.Tensor, np.ndarray, int, float]]:
    """Exact-mode views of ``rows``: {row: (mixed uint8 view, params record incl. mix, partner label, λ)}.

    ``samples`` must hold every row of the pairing windows around ``rows``
    (``shared.mixing.rows_with_partners``); each row's own view is rendered once and reused as a partner."""
    from shared.mixing import mix_views, partner_of, sample_mix
    by_row = {s.row: s for s in samples}
    own: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def own_view(row: int):
        if row not in own:
            if row not in by_row:
                raise KeyError(f"row {row} (a mixing partner) was not loaded; load the whole pairing window")
            own[row] = render_view(spec, seed, view, by_row[row])
        return own[row]

    out = {}
    for row in rows:
        raw = by_row[row]
        partner = partner_of(manifest, row, spec.mix_window, seed, view)
        mix = sample_mix(spec, seed, raw.key, view, row, partner)
        tensor, record = own_view(row)
        if mix.kind:
            tensor = mix_views(tensor, own_view(partner)[0], mix)
        full = np.concatenate([record, np.asarray(mix.encode(), dtype=np.float32)])
        partner_label = by_row[mix.partner].label if mix.kind else raw.label
        out[row] = (tensor, full, partner_label, mix.lam)
    return out
