"""Elementary functions and random variates that give the same bits on every machine.

The C library's ``exp``/``log``/``sin``/``cos`` (which ``math`` and numpy's ``beta``/``standard_normal`` use) are not
correctly rounded, and glibc picks an FMA or a plain variant per CPU at run time, so their last bit may differ
between machines.  A view must not depend on that.  Everything here is built from IEEE-754 basic operations
(+ − × ÷ √, comparisons, ``frexp``/``ldexp``), which every conforming machine rounds identically, with fixed
series lengths: accurate to a few ulp and bit-identical everywhere.  Also the Gaussian quantiser used for
random-erasing noise, computed in ``decimal`` (software arithmetic) and applied with integer comparisons.
"""
from __future__ import annotations

import functools
import math
from decimal import Decimal, localcontext

import numpy as np

LN2 = 0.6931471805599453
TWO_PI = 6.283185307179586
_SQRT_HALF = 0.7071067811865476


def log(x: float) -> float:
    """Natural log of ``x`` > 0: exact range reduction to m in [√½, √2), then 2·atanh((m−1)/(m+1)) by series."""
    if not x > 0:
        raise ValueError(f"log of {x}")
    m, e = math.frexp(x)            # x = m · 2**e, m in [0.5, 1): exact
    if m < _SQRT_HALF:
        m, e = m * 2.0, e - 1       # exact
    t = (m - 1.0) / (m + 1.0)       # |t| <= 0.1716
    t2 = t * t
    acc = 0.0
    for k in range(25, 0, -2):      # t2**13 < 1e-19: 13 terms
        acc = acc * t2 + 1.0 / k
    return e * LN2 + 2.0 * t * acc


def exp(x: float) -> float:
    """e**x: x = k·ln2 + r with integer k, |r| <= ~0.35, Taylor series of r (20 terms), then ldexp (exact)."""
    if x > 709.0:
        return math.inf
    if x < -745.0:
        return 0.0
    k = int(round(x / LN2))
    r = x - k * LN2
    acc = 1.0
    for n in range(20, 0, -1):
        acc = 1.0 + acc * r / n
    return math.ldexp(acc, k)


def sin_cos(x: float) -> tuple[float, float]:
    """(sin x, cos x) for |x| <= 3.2 (callers reduce first): Taylor series, 16 terms (3.2**32 / 32! < 1e-17)."""
    if abs(x) > 3.2:
        raise ValueError(f"sin_cos argument {x} outside [-3.2, 3.2]")
    x2 = x * x
    s = c = 1.0
    for n in range(16, 0, -1):      # sin: x·Σ (−x²)^n / (2n+1)!, cos: Σ (−x²)^n / (2n)!
        s = 1.0 - s * x2 / ((2 * n) * (2 * n + 1))
        c = 1.0 - c * x2 / ((2 * n - 1) * (2 * n))
    return x * s, c


def normal_from(u1: float, u2: float) -> float:
    """One standard normal from two uniforms in [0, 1) (Box–Muller, a fixed number of draws)."""
    radius = math.sqrt(-2.0 * log(1.0 - u1))        # 1 − u1 in (0, 1]
    turn = u2 - round(u2)                            # in [−½, ½]: exact
    return radius * sin_cos(TWO_PI * turn)[1]


def gamma(rng: np.random.Generator, shape: float) -> float:
    """Gamma(shape, 1) by Marsaglia–Tsang (shape < 1 boosted by U**(1/shape)); uniforms from ``rng.random``."""
    if shape <= 0:
        raise ValueError(f"gamma shape must be positive, got {shape}")
    boost = 1.0
    if shape < 1.0:
        boost = exp(log(1.0 - rng.random()) / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = normal_from(rng.random(), rng.random())
        v = 1.0 + c * x
        if v <= 0:
            continue
        v = v * v * v
        u = 1.0 - rng.random()                      # (0, 1]
        if u < 1.0 - 0.0331 * x * x * x * x or log(u) < 0.5 * x * x + d * (1.0 - v + log(v)):
            return d * v * boost


def beta(rng: np.random.Generator, a: float, b: float) -> float:
    """Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b)."""
    x, y = gamma(rng, a), gamma(rng, b)
    return x / (x + y) if x + y > 0 else 0.5


# ---------------------------------------------------------------------------------------------------------------
# Quantised Gaussian noise: pixel = clamp(round(255 · (mean + std · z))), z ~ N(0, 1), from 32-bit uniforms

def _phi(z: Decimal) -> Decimal:
    """Standard normal CDF in 50-digit decimal arithmetic (erf series; |z/√2| clamped at 6: 1 − erf < 2e-17)."""
    x = z / Decimal(2).sqrt()
    if x > 6:
        return Decimal(1)
    if x < -6:
        return Decimal(0)
    term, total, n, x2 = x, x, 0, x * x
    while abs(term) > Decimal("1e-45"):
        n += 1
        term = -term * x2 / n
        total += term / (2 * n + 1)
    pi = Decimal("3.14159265358979323846264338327950288419716939937510")
    return (1 + 2 * total / pi.sqrt()) / 2


@functools.lru_cache(maxsize=16)
def noise_thresholds(mean: float, std: float) -> np.ndarray:
    """uint64 (255,): a 32-bit uniform ``r`` gives pixel k = #{thresholds <= r}, so P(pixel <= k) = T_k / 2**32 =
    P(255·(mean + std·z) < k + ½), exact to 2**-32.  Computed in software decimal: identical on every machine."""
    if std <= 0:
        raise ValueError(f"erasing noise std must be positive, got {std}")
    with localcontext() as ctx:
        ctx.prec = 50
        m, s = Decimal(mean), Decimal(std)
        out = []
        for k in range(255):
            p = _phi(((Decimal(k) + Decimal("0.5")) / 255 - m) / s)
            out.append(min(int(p * (1 << 32)), 1 << 32))
    return np.asarray(out, dtype=np.uint64)


@functools.lru_cache(maxsize=16)
def _noise_lut(mean: float, std: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixel of every 16-bit prefix of ``r``, and which prefixes hold a threshold (those need the full 32 bits)."""
    thresholds = noise_thresholds(mean, std)
    starts = np.arange(1 << 16, dtype=np.uint64) << np.uint64(16)
    first = np.searchsorted(thresholds, starts, side="right")
    last = np.searchsorted(thresholds, starts + np.uint64(0xFFFF), side="right")
    return thresholds, first.astype(np.uint8), first != last


def quantised_normal(bits: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels from uint32 uniform ``bits`` (any shape): integer table look-ups and comparisons only."""
    thresholds, lut, ambiguous = _noise_lut(float(mean), float(std))
    prefix = bits >> np.uint32(16)
    pixels = lut[prefix]
    fix = ambiguous[prefix]
    if fix.any():
        pixels[fix] = np.searchsorted(thresholds, bits[fix].astype(np.uint64), side="right")
    return pixels


def uniform_bits(key: int, count: int) -> np.ndarray:
    """``count`` uint32 uniforms from a Philox stream keyed by ``key`` (the raw 64-bit outputs, split
    explicitly, so the result does not depend on the machine's byte order)."""
    raw = np.random.Philox(key=key).random_raw((count + 1) // 2)
    halves = np.stack([raw & np.uint64(0xFFFFFFFF), raw >> np.uint64(32)], axis=-1).reshape(-1)[:count]
    return halves.astype(np.uint32)
