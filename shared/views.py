"""One stage both pipelines share: raw sample -> (augmented view, params record) for a given view index."""
from __future__ import annotations

import numpy as np
import torch

from shared.augment import ViewSpec, apply_view, eval_view, sample_view
from shared.reader import RawSample
from shared.shards import decode_image, image_field


def decode(raw: RawSample):
    field = image_field(raw.data)
    return decode_image(raw.data[field], raw.shard_url, raw.key)


def render_view(spec: ViewSpec, seed: int, view: int, raw: RawSample) -> tuple[torch.Tensor, np.ndarray]:
    """The uint8 view tensor and its float32 params record for view ``view`` of ``raw``."""
    params = sample_view(spec, seed, raw.key, view)
    return apply_view(spec, decode(raw), params), params.encode(spec)


def render_eval(spec: ViewSpec, raw: RawSample) -> torch.Tensor:
    return eval_view(spec, decode(raw))
