"""Corrupted copies of a test set: a small-scale analogue of the paper's out-of-distribution comparisons.

Each corruption is a pure function ``(image, severity, rng) -> image`` on uint8 arrays (H, W) or (H, W, C) that
keeps shape and dtype.  Strengths are in *relative* units (fractions of the image side, of the [0, 1] range), so a
severity means the same thing at 28 px and at 224 px.  Random choices (shift direction, rotation sign, noise) come
from a generator keyed by a stable hash of (seed, key), so a corrupted set is reproducible sample by sample and
does not depend on the order or process in which samples are corrupted.  Every severity changes any non-constant
image: geometric strengths are at least one pixel / several degrees by construction.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

SEVERITIES = (1, 2, 3, 4, 5)

# strength per severity 1..5
SHIFT_FRACTION = (0.04, 0.08, 0.12, 0.16, 0.20)       # translation, fraction of the image side (>= 1 px)
ROTATION_DEGREES = (10.0, 20.0, 30.0, 45.0, 60.0)     # random sign
SCALE_FACTOR = (0.9, 0.8, 0.7, 0.6, 0.5)              # shrink about the centre
NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)            # on the [0, 1] pixel range (ImageNet-C's values)
BLUR_FRACTION = (0.018, 0.027, 0.036, 0.054, 0.071)   # Gaussian std, fraction of the side (0.5..2 px at 28 px)
CONTRAST_FACTOR = (0.5, 0.4, 0.3, 0.2, 0.1)           # pixels pulled towards the image mean


def corruption_generator(seed: int, key: str) -> np.random.Generator:
    """Counter-based generator keyed by a stable hash of (seed, key): same stream in any process."""
    digest = hashlib.blake2b(f"corrupt\x1f{int(seed)}\x1f{key}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def _level(table: tuple, severity: int):
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be one of {SEVERITIES}, got {severity!r}")
    return table[severity - 1]


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"corruptions take uint8 (H, W) or (H, W, 1|3) arrays, got {image.dtype} {image.shape}")
    return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def _from_pil(result: Image.Image, like: np.ndarray) -> np.ndarray:
    return np.asarray(result, dtype=np.uint8).reshape(like.shape)


def _fill(image: Image.Image):
    return 0 if image.mode == "L" else (0, 0, 0)


def shift(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Translate by a whole number of pixels in a random direction; uncovered pixels become 0."""
    h, w = image.shape[:2]
    distance = max(_level(SHIFT_FRACTION, severity) * min(h, w), 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = int(round(distance * np.cos(angle))), int(round(distance * np.sin(angle)))
    if dx == dy == 0:   # cannot happen for distance >= 1 (max(|cos|, |sin|) >= 0.71), kept as a guard
        dx = 1
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def rotation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate about the centre by a fixed angle with random sign (bilinear, 0 fill)."""
    angle = _level(ROTATION_DEGREES, severity) * (1 if rng.uniform() < 0.5 else -1)
    pil = _to_pil(image)
    return _from_pil(pil.rotate(angle, resample=Image.BILINEAR, fillcolor=_fill(pil)), image)


def scale(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shrink the content about the centre (bilinear, 0 fill): the object gets smaller, the canvas does not."""
    factor = _level(SCALE_FACTOR, severity)
    pil = _to_pil(image)
    w, h = pil.size
    cx, cy = w / 2, h / 2
    coeffs = (1 / factor, 0, cx - cx / factor, 0, 1 / factor, cy - cy / factor)   # output -> input mapping
    return _from_pil(pil.transform(pil.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_fill(pil)),
                     image)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise (std on the [0, 1] range), then round and clip."""
    std = _level(NOISE_STD, severity) * 255.0
    noisy = image.astype(np.float64) + rng.normal(0.0, std, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with a std proportional to the image side."""
    sigma = _level(BLUR_FRACTION, severity) * min(image.shape[:2])
    return _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(sigma)), image)


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pull every pixel towards the image mean by a fixed factor."""
    factor = _level(CONTRAST_FACTOR, severity)
    mean = image.mean()
    return np.clip(np.rint((image.astype(np.float64) - mean) * factor + mean), 0, 255).astype(np.uint8)


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "shift": shift, "rotation": rotation, "scale": scale,
    "gaussian_noise": gaussian_noise, "blur": blur, "contrast": contrast,
}


def corrupt(name: str, image: np.ndarray, severity: int, seed: int = 0, key: str = "") -> np.ndarray:
    """Corruption ``name`` at ``severity`` of one image; deterministic in (name, image, severity, seed, key)."""
    try:
        function = CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}") from None
    return function(image, severity, corruption_generator(seed, key))
