"""What a view is, without rendering it: the augmentation recipe (``ViewSpec``), the params record that stores
a view's random choices (``PARAMS_FIELDS``), and the sampling of those choices (``sample_view``).

A view is fully determined by (spec, seed, sample key, view index v).  ``sample_view`` draws every random choice
from one counter-based generator (Philox) keyed by a stable hash of (seed, key, v) — never from global RNG state,
worker id, batch position or process count — and returns them as a ``ViewParams`` record; ``shared.augment``
turns (spec, image, params) into pixels.  Positions and sizes are sampled in *relative* units so a view's params
do not depend on the image size.  Draws are Philox bits; arithmetic on them is IEEE basic operations
(``shared.exact_math``), so the same params come out on every machine.

Only numpy here (no torch, no Pillow): commands that read or copy a cache (``cit cache info``, ``export``,
``merge``) need the spec and the record layout, and start in a fraction of a second without torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from shared import exact_math

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_LEVEL = 10.0            # RandAugment levels lie in [-MAX_LEVEL, MAX_LEVEL]
# timm's RandAugment "increasing" op set; a record's op id is the index in this tuple (``shared.augment.RAND_OPS``
# holds each op's function, in this order)
RAND_OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                 "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                 "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


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
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"augment.interpolation must be one of {sorted(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
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
        magnitude = min(max(spec.ra_magnitude + spec.ra_magnitude_std * normal, 0.0), MAX_LEVEL)
        level = -magnitude if sign < 0.5 else magnitude
        ops.append((int(which * len(RAND_OP_NAMES)), _f32(level)) if applied < spec.ra_prob else (-1, 0.0))
    tail = u[5 + 5 * n:]
    erase = _box(tail[1:5], spec.erase_area, spec.erase_ratio) if tail[0] < spec.erase_prob else None
    return ViewParams(crop=crop if spec.rrc else (1.0, 0.0, 0.5, 0.5), flip=flip, ops=ops, erase=erase,
                      noise_seed=int(tail[5] * (1 << 24)))
