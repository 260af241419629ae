"""Replayable augmented views.

A view is fully determined by (spec, seed, sample key, view index v).  ``sample_view`` draws every random choice
from one counter-based generator (Philox) keyed by a stable hash of (seed, key, v) — never from global RNG state,
worker id, batch position or process count — and returns them as a ``ViewParams`` record.  ``apply_view`` is a
pure function of (spec, image, params).  Stage 1 and stage 2 call the same two functions (through
``shared.views``), so the student trains on exactly the pixels the teacher saw.

The same pixels on every machine: nothing in a view comes from torch (whose kernels change with the CPU vector
path) or from the C library's transcendental functions (whose last bit glibc picks per CPU).  Draws are Philox
bits; arithmetic on them is IEEE basic operations (``shared.exact_math``); pixels come from Pillow and numpy
integer/element-wise operations.  The erasing noise is a Philox stream quantised by an integer table.

Views are uint8 tensors (C, H, W): 4x less to move between processes and to the GPU than float, and bit-exact
comparison is trivial.  Normalisation happens on the device, per model (``to_model_input``).

Recipe follows timm/DeiT: random-resized-crop -> horizontal flip -> RandAugment (timm's ``rand-m9-mstd0.5-inc1``
op set, each op applied with probability ``ra_prob``) -> random erasing (per-pixel Gaussian fill).  Positions and
sizes are sampled in *relative* units so a view's params do not depend on the image size; ``apply_view`` turns
them into pixels.  The crop box is clamped to the image instead of timm's 10-try rejection loop (documented
deviation: at most a slightly different crop-size distribution).
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from shared import exact_math


@dataclass(frozen=True)
class ViewSpec:
    """Augmentation recipe.  Part of the cache's identity: a cache is only valid for the spec it was built with."""
    image_size: int = 28
    rrc: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"          # bilinear | bicubic | nearest
    hflip: float = 0.5
    ra_num_ops: int = 2                      # 0 disables RandAugment
    ra_magnitude: float = 9.0
    ra_magnitude_std: float = 0.5
    ra_prob: float = 0.5
    erase_prob: float = 0.25
    erase_area: tuple[float, float] = (0.02, 1 / 3)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    mean: tuple[float, ...] = (0.5,)         # pixel statistics in [0, 1]: random-erasing fill (N(mean, std))
    std: tuple[float, ...] = (0.5,)          # and the default student input normalisation
    mix: str = "off"                         # off | exact (mixing is part of the view) | approx (trainer mixes)
    mixup_alpha: float = 0.8                 # 0 disables mixup
    cutmix_alpha: float = 1.0                # 0 disables cutmix
    mix_prob: float = 1.0                    # probability that a sample (exact) / batch (approx) is mixed
    mix_switch_prob: float = 0.5             # probability of cutmix when both are enabled
    mix_window: int = 64                     # exact: rows per pairing window (see shared.mixing)

    @classmethod
    def from_dict(cls, data: dict) -> "ViewSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {unknown}; known: {sorted(known)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"augment.image_size must be positive, got {self.image_size}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"augment.interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ValueError(f"augment.rrc_scale must satisfy 0 < lo <= hi <= 1, got {self.rrc_scale}")
        for name in ("hflip", "ra_prob", "erase_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} is a probability, got {getattr(self, name)}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"augment.mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.mix_window < 2:
            raise ValueError(f"augment.mix_window must be >= 2, got {self.mix_window}")
        for name in ("mix_prob", "mix_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} is a probability, got {getattr(self, name)}")
        if self.ra_num_ops < 0:
            raise ValueError(f"augment.ra_num_ops must be >= 0, got {self.ra_num_ops}")

    @property
    def mixes_views(self) -> bool:
        """Whether mixing is part of each cached view (``exact``): the one place that decides it."""
        return self.mix == "exact"

    @property
    def num_params(self) -> int:
        """Length of a view's params record (``PARAMS_FIELDS``): the augmentation part, plus the mix part in exact
        mode."""
        return record_size(self)

    def view_identity(self) -> dict:
        """What defines the *cached* views.  Mix settings only count in exact mode: an ``approx`` or ``off`` run
        trains on the same unmixed cached views."""
        data = self.to_dict()
        if not self.mixes_views:
            for name in MIX_FIELDS:
                data.pop(name)
        return data


MIX_MODES = ("off", "exact", "approx")
MIX_FIELDS = ("mix", "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob", "mix_window")


# ---------------------------------------------------------------------------------------------------------------
# The params record: one declarative field table drives its encoding, decoding and length

@dataclass(frozen=True)
class Field:
    name: str
    width: int = 1
    repeat: str = ""        # a ViewSpec attribute giving how many times the field repeats ("" = once)
    part: str = "view"      # view | mix (the mix part exists only when the spec mixes views)


# Bump when the layout or the meaning of a field changes: it is part of the cache identity (``VIEW_CODE``).
PARAMS_LAYOUT_VERSION = 2
PARAMS_FIELDS: tuple[Field, ...] = (
    Field("crop", 4),                       # area fraction, log aspect, u_top, u_left
    Field("flip"),                          # 0 | 1
    Field("op", 2, repeat="ra_num_ops"),    # op id (-1: skipped), signed level
    Field("erase_on"),                      # 0 | 1
    Field("erase", 4),                      # area fraction, log aspect, u_top, u_left (0 when off)
    Field("noise_seed"),                    # key of the erasing noise's Philox stream (< 2**24)
    Field("mix_kind", part="mix"),          # shared.mixing.MIX_NONE | MIX_MIXUP | MIX_CUTMIX
    Field("mix_partner", part="mix"),       # partner row, -1 when not mixed
    Field("mix_lam", part="mix"),           # weight of the row's own view
    Field("mix_box", 4, part="mix"),        # CutMix box: top, left, h, w (pixels)
)


def record_slices(spec: "ViewSpec | None", parts: tuple[str, ...] | None = None) -> dict[str, slice]:
    """name -> slice of the record, for the parts present (default: all parts this spec's record has)."""
    if parts is None:
        parts = ("view", "mix") if spec is not None and spec.mixes_views else ("view",)
    out, at = {}, 0
    for f in PARAMS_FIELDS:
        if f.part not in parts:
            continue
        width = f.width * (int(getattr(spec, f.repeat)) if f.repeat else 1)
        out[f.name] = slice(at, at + width)
        at += width
    return out


def record_size(spec: "ViewSpec | None", parts: tuple[str, ...] | None = None) -> int:
    slices = record_slices(spec, parts)
    return max((s.stop for s in slices.values()), default=0)


def encode_record(spec: "ViewSpec | None", values: dict, parts: tuple[str, ...] | None = None) -> np.ndarray:
    """The float32 record of ``values`` (name -> number or sequence); every field of ``parts`` must be given."""
    slices = record_slices(spec, parts)
    if set(values) != set(slices):
        raise ValueError(f"params record fields {sorted(values)} do not match the layout {list(slices)}")
    record = np.empty(record_size(spec, parts), dtype=np.float32)
    for name, where in slices.items():
        record[where] = np.asarray(values[name], dtype=np.float64).reshape(-1)
    return record


def decode_record(spec: "ViewSpec | None", record: np.ndarray,
                  parts: tuple[str, ...] | None = None) -> dict[str, list[float]]:
    record = np.asarray(record, dtype=np.float32)
    size = record_size(spec, parts)
    if record.shape != (size,):
        raise ValueError(f"params record has shape {record.shape}, the layout expects ({size},)")
    return {name: [float(x) for x in record[where]] for name, where in record_slices(spec, parts).items()}


@dataclass
class ViewParams:
    """All random choices of one view (the ``view`` part of ``PARAMS_FIELDS``).  Every field is exactly
    representable in float32 (integers < 2**24), so decode(encode(p)) == p and apply sees the same numbers."""
    crop: tuple[float, float, float, float] = (1.0, 0.0, 0.5, 0.5)   # area fraction, log aspect, u_top, u_left
    flip: bool = False
    ops: list[tuple[int, float]] = field(default_factory=list)       # (op id or -1 for skipped, signed level)
    erase: tuple[float, float, float, float] | None = None           # area fraction, log aspect, u_top, u_left
    noise_seed: int = 0

    @staticmethod
    def size(spec: ViewSpec) -> int:
        return record_size(spec, ("view",))

    def encode(self, spec: ViewSpec) -> np.ndarray:
        ops = list(self.ops) + [(-1, 0.0)] * (spec.ra_num_ops - len(self.ops))
        return encode_record(spec, {"crop": self.crop, "flip": float(self.flip), "op": ops,
                                    "erase_on": float(self.erase is not None), "erase": self.erase or (0.0,) * 4,
                                    "noise_seed": self.noise_seed}, ("view",))

    @classmethod
    def decode(cls, record: np.ndarray, spec: ViewSpec) -> "ViewParams":
        r = decode_record(spec, record, ("view",))
        ops = [(int(r["op"][2 * i]), r["op"][2 * i + 1]) for i in range(spec.ra_num_ops)]
        erase = tuple(r["erase"]) if r["erase_on"][0] > 0 else None
        return cls(crop=tuple(r["crop"]), flip=r["flip"][0] > 0, ops=ops, erase=erase,
                   noise_seed=int(r["noise_seed"][0]))


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def view_generator(seed: int, key: str, view: int) -> np.random.Generator:
    """Counter-based generator keyed by a stable hash of (seed, key, view): same stream in any process."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{key}\x1f{int(view)}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def _f32(x: float) -> float:
    return float(np.float32(x))


def _box(u: np.ndarray, area: tuple[float, float], ratio: tuple[float, float]) -> tuple:
    """Four uniforms -> relative box (area fraction, log aspect, u_top, u_left), float32-exact."""
    log_lo, log_hi = exact_math.log(ratio[0]), exact_math.log(ratio[1])
    return (_f32(area[0] + u[0] * (area[1] - area[0])), _f32(log_lo + u[1] * (log_hi - log_lo)),
            _f32(u[2]), _f32(u[3]))


def sample_view(spec: ViewSpec, seed: int, key: str, view: int) -> ViewParams:
    """Every draw comes from one block of uniforms in a fixed layout, so switching an op off (or on) leaves the
    other ops' draws alone, and one generator call serves the whole view (it is on the loader's hot path).
    Uniforms are Philox bits scaled by 2**-53 (exact); the magnitude noise is Box–Muller in ``exact_math``."""
    rng = view_generator(seed, key, view)
    n = spec.ra_num_ops
    u = rng.random(5 + 5 * n + 6)   # crop(4) flip(1) | per op: applied, op, sign, normal(2) | erase(1+4) seed(1)
    crop = _box(u[0:4], spec.rrc_scale, spec.rrc_ratio)
    flip = bool(u[4] < spec.hflip)
    ops = []
    for i in range(n):
        applied, which, sign, n1, n2 = (float(x) for x in u[5 + 5 * i: 10 + 5 * i])
        normal = exact_math.normal_from(n1, n2)
        magnitude = min(max(spec.ra_magnitude + spec.ra_magnitude_std * normal, 0.0), _MAX_LEVEL)
        level = -magnitude if sign < 0.5 else magnitude
        ops.append((int(which * len(RAND_OPS)), _f32(level)) if applied < spec.ra_prob else (-1, 0.0))
    tail = u[5 + 5 * n:]
    erase = _box(tail[1:5], spec.erase_area, spec.erase_ratio) if tail[0] < spec.erase_prob else None
    return ViewParams(crop=crop if spec.rrc else (1.0, 0.0, 0.5, 0.5), flip=flip, ops=ops, erase=erase,
                      noise_seed=int(tail[5] * (1 << 24)))


# ---------------------------------------------------------------------------------------------------------------
# Applying

_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
_MAX_LEVEL = 10.0


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
    return lambda img, level: cls(img).enhance(1.0 + level / _MAX_LEVEL * 0.9)


# timm's RandAugment "increasing" op set; level in [-10, 10] (sign used by signed ops)
RAND_OPS: list[tuple[str, callable]] = [
    ("AutoContrast", lambda img, level: ImageOps.autocontrast(img)),
    ("Equalize", lambda img, level: ImageOps.equalize(img)),
    ("Invert", lambda img, level: ImageOps.invert(img)),
    ("Rotate", lambda img, level: _rotate(img, level / _MAX_LEVEL * 30.0)),
    ("PosterizeIncreasing", lambda img, level: ImageOps.posterize(img, max(1, 4 - int(abs(level) / _MAX_LEVEL * 4)))),
    ("SolarizeIncreasing", lambda img, level: ImageOps.solarize(img, 256 - int(abs(level) / _MAX_LEVEL * 256))),
    ("SolarizeAdd", lambda img, level: _solarize_add(img, int(abs(level) / _MAX_LEVEL * 110))),
    ("ColorIncreasing", _enhance(ImageEnhance.Color)),
    ("ContrastIncreasing", _enhance(ImageEnhance.Contrast)),
    ("BrightnessIncreasing", _enhance(ImageEnhance.Brightness)),
    ("SharpnessIncreasing", _enhance(ImageEnhance.Sharpness)),
    ("ShearX", lambda img, level: _affine(img, (1, level / _MAX_LEVEL * 0.3, 0, 0, 1, 0))),
    ("ShearY", lambda img, level: _affine(img, (1, 0, 0, level / _MAX_LEVEL * 0.3, 1, 0))),
    ("TranslateXRel", lambda img, level: _affine(img, (1, 0, level / _MAX_LEVEL * 0.45 * img.size[0], 0, 1, 0))),
    ("TranslateYRel", lambda img, level: _affine(img, (1, 0, 0, 0, 1, level / _MAX_LEVEL * 0.45 * img.size[1]))),
]


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
