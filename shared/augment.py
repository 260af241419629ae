"""Replayable augmented views: rendering.

A view is fully determined by (spec, seed, sample key, view index v): ``shared.view_spec`` holds the recipe
(``ViewSpec``), the params record and ``sample_view``, which draws every random choice of the view; ``apply_view``
here is a pure function of (spec, image, params).  Stage 1 and stage 2 call the same two functions (through
``shared.views``), so the student trains on exactly the pixels the teacher saw.  The names of ``shared.view_spec``
are importable from here too.

The same pixels on every machine: nothing in a view comes from torch (whose kernels change with the CPU vector
path) or from the C library's transcendental functions (whose last bit glibc picks per CPU).  Draws are Philox
bits; arithmetic on them is IEEE basic operations (``shared.exact_math``); pixels come from Pillow and numpy
integer/element-wise operations.  The erasing noise is a Philox stream quantised by an integer table.

Views are uint8 tensors (C, H, W): 4x less to move between processes and to the GPU than float, and bit-exact
comparison is trivial.  Normalisation happens on the device, per model (``to_model_input``).

Recipe follows timm/DeiT: random-resized-crop -> horizontal flip -> RandAugment (timm's ``rand-m9-mstd0.5-inc1``
op set, each op applied with probability ``ra_prob``) -> random erasing (per-pixel Gaussian fill).  Positions and
sizes are sampled in *relative* units; ``apply_view`` turns them into pixels.  The crop box is clamped to the image
instead of timm's 10-try rejection loop (documented deviation: at most a slightly different crop-size
distribution).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from shared import exact_math
from shared.view_spec import (INTERPOLATIONS, MAX_LEVEL, MIX_FIELDS, MIX_MODES, PARAMS_FIELDS, PARAMS_LAYOUT_VERSION,
                              RAND_OP_NAMES, Field, ViewParams, ViewSpec, decode_record, encode_record, record_size,
                              record_slices, sample_view, view_generator)

# the rendering, and the names of ``shared.view_spec`` its callers have always imported from here
__all__ = ["RAND_OPS", "apply_view", "apply_view_array", "box_pixels", "erase_noise", "eval_view", "to_model_input",
           "to_uint8_array", "to_uint8_tensor", "MAX_LEVEL", "MIX_FIELDS", "MIX_MODES", "PARAMS_FIELDS",
           "PARAMS_LAYOUT_VERSION", "RAND_OP_NAMES", "Field", "ViewParams", "ViewSpec", "decode_record",
           "encode_record", "record_size", "record_slices", "sample_view", "view_generator"]

# ---------------------------------------------------------------------------------------------------------------
# Applying

_INTERPOLATION = {name: getattr(Image, name.upper()) for name in INTERPOLATIONS}


def box_pixels(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """Relative (area, log aspect, u_top, u_left) -> integer (top, left, h, w), clamped inside the image."""
    area, log_ratio, u_top, u_left = box
    target = area * height * width
    ratio = exact_math.exp(log_ratio)
    w = min(max(int(round(math.sqrt(target * ratio))), 1), width)
    h = min(max(int(round(math.sqrt(target / ratio))), 1), height)
    top = min(int(u_top * (height - h + 1)), height - h)
    left = min(int(u_left * (width - w + 1)), width - w)
    return top, left, h, w


def _fill(image: Image.Image):
    return 128 if image.mode == "L" else (128, 128, 128)


def _affine(image: Image.Image, coeffs: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_fill(image))


def _enhance(cls):
    return lambda img, level: cls(img).enhance(1.0 + level / MAX_LEVEL * 0.9)


# Each op of ``RAND_OP_NAMES`` (whose order gives the op ids); level in [-10, 10] (sign used by signed ops)
_OP_FUNCTIONS: dict[str, callable] = {
    "AutoContrast": lambda img, level: ImageOps.autocontrast(img),
    "Equalize": lambda img, level: ImageOps.equalize(img),
    "Invert": lambda img, level: ImageOps.invert(img),
    "Rotate": lambda img, level: _rotate(img, level / MAX_LEVEL * 30.0),
    "PosterizeIncreasing": lambda img, level: ImageOps.posterize(img, max(1, 4 - int(abs(level) / MAX_LEVEL * 4))),
    "SolarizeIncreasing": lambda img, level: ImageOps.solarize(img, 256 - int(abs(level) / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda img, level: _solarize_add(img, int(abs(level) / MAX_LEVEL * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level: _affine(img, (1, level / MAX_LEVEL * 0.3, 0, 0, 1, 0)),
    "ShearY": lambda img, level: _affine(img, (1, 0, 0, level / MAX_LEVEL * 0.3, 1, 0)),
    "TranslateXRel": lambda img, level: _affine(img, (1, 0, level / MAX_LEVEL * 0.45 * img.size[0], 0, 1, 0)),
    "TranslateYRel": lambda img, level: _affine(img, (1, 0, 0, 0, 1, level / MAX_LEVEL * 0.45 * img.size[1])),
}
RAND_OPS: list[tuple[str, callable]] = [(name, _OP_FUNCTIONS[name]) for name in RAND_OP_NAMES]


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    """``Image.rotate(degrees, BILINEAR)`` about the centre, with the matrix from ``exact_math.sin_cos`` instead of
    the C library's (Pillow's own code otherwise: the same reverse affine matrix, rounded to 15 digits)."""
    if degrees % 360.0 == 0:
        return image.copy()
    w, h = image.size
    sin, cos = exact_math.sin_cos(-degrees * (math.pi / 180.0))
    a, b, d, e = round(cos, 15), round(sin, 15), round(-sin, 15), round(cos, 15)
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return image.transform((w, h), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR,
                           fillcolor=_fill(image))


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * (3 if image.mode == "RGB" else 1))


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """uint8 (C, H, W), C-contiguous and writable (erasing writes into it)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return np.array(array[None])
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(to_uint8_array(image))


def apply_view(spec: ViewSpec, image: Image.Image, params: ViewParams) -> torch.Tensor:
    """The view as a uint8 tensor (C, image_size, image_size).  Pure: same inputs, same bytes."""
    return torch.from_numpy(apply_view_array(spec, image, params))


def apply_view_array(spec: ViewSpec, image: Image.Image, params: ViewParams) -> np.ndarray:
    """``apply_view`` as a numpy array (C-contiguous uint8): what the renderer digests."""
    width, height = image.size
    top, left, h, w = box_pixels(params.crop, height, width)
    size = (spec.image_size, spec.image_size)
    if (top, left, h, w) != (0, 0, height, width) or image.size != size:
        image = image.resize(size, _INTERPOLATION[spec.interpolation], box=(left, top, left + w, top + h))
    if params.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for op, level in params.ops:
        if op >= 0:
            image = RAND_OPS[op][1](image, level)
    view = to_uint8_array(image)
    if params.erase is not None:
        erase_noise(spec, view, params)
    return view


_NOISE_DOMAIN = 0x4E4F495345 << 32      # keeps the noise streams apart from every other Philox key of a view


def erase_noise(spec: ViewSpec, view: np.ndarray, params: ViewParams) -> None:
    """Fill the erase box of ``view`` (uint8 C, H, W; in place) with per-pixel N(mean, std) noise quantised to
    uint8 — from a Philox stream keyed by the record's noise seed and integer table look-ups, so no CPU vector
    path or thread count can change it."""
    c = view.shape[0]
    top, left, h, w = box_pixels(params.erase, spec.image_size, spec.image_size)
    bits = exact_math.uniform_bits(_NOISE_DOMAIN + params.noise_seed, c * h * w).reshape(c, h, w)
    for channel, (mean, std) in enumerate(zip(_per_channel(spec.mean, c), _per_channel(spec.std, c))):
        view[channel, top:top + h, left:left + w] = exact_math.quantised_normal(bits[channel], mean, std)


def eval_view(spec: ViewSpec, image: Image.Image) -> torch.Tensor:
    """The deterministic evaluation view: the whole image resized to image_size."""
    size = (spec.image_size, spec.image_size)
    if image.size != size:
        image = image.resize(size, _INTERPOLATION[spec.interpolation])
    return to_uint8_tensor(image)


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise ValueError(f"normalisation has {len(values)} values for a {channels}-channel image")


@functools.lru_cache(maxsize=64)
def _norm_tensors(mean: tuple[float, ...], std: tuple[float, ...], channels: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device mean/std, built once: building them per call would copy from host every step (a sync on CUDA)."""
    mean_t = torch.tensor(_per_channel(mean, channels), device=device).view(1, channels, 1, 1)
    std_t = torch.tensor(_per_channel(std, channels), device=device).view(1, channels, 1, 1)
    return mean_t, std_t


def to_model_input(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) views -> normalised float, on whatever device ``views`` lives on."""
    mean_t, std_t = _norm_tensors(tuple(mean), tuple(std), views.shape[1], views.device)
    return (views.float() / 255.0 - mean_t) / std_t     # out of place: float input stays untouched
