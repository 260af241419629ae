"""Golden views: digests of a few dozen views (28 px grey, 224 px RGB; RandAugment, erasing, exact mixup/cutmix).

``tests/golden_views.json`` is written deliberately, never by a test:

    PYTHONPATH=. python -m tests.golden_views --write

Regenerate it only when the view code changed on purpose (and bump ``shared.views.RENDERER_VERSION``).  The test
renders the same views here and in subprocesses under every ``ATEN_CPU_CAPABILITY`` this CPU has.
"""
from __future__ import annotations

import argparse
import json
import os
import zlib

import numpy as np
from PIL import Image

from shared.augment import ViewSpec, apply_view, sample_view
from shared.mixing import mix_views, sample_mix
from shared.views import VIEW_CODE, pixel_digest

GOLDEN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_views.json")
SEED = 11
VIEWS = 2
SPECS = {
    "grey28": (ViewSpec(image_size=28, ra_prob=0.9, erase_prob=0.6, mean=(0.3,), std=(0.35,), mix="exact"),
               16, (34, 30), "L"),
    "rgb224": (ViewSpec(image_size=224, interpolation="bicubic", ra_prob=0.9, erase_prob=0.6,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), mix="exact", mix_prob=1.0),
               6, (300, 260), "RGB"),
}


def source_image(index: int, size: tuple[int, int], mode: str) -> Image.Image:
    """A deterministic picture: a gradient plus PCG64 noise (integer draws: the same on every machine)."""
    w, h = size
    rng = np.random.default_rng([index, w, h])
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 // max(w - 1, 1) + y * 128 // max(h - 1, 1)) % 256
    channels = 1 if mode == "L" else 3
    noise = rng.integers(0, 64, (h, w, channels))
    pixels = ((base[..., None] + noise + 40 * np.arange(channels)) % 256).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def render_golden() -> dict:
    """{name: [{"key", "view", "params", "pixels", "mixed_params", "mixed_pixels", "mix_kind", "ops", "erase"}]}:
    crc32 of each own view's params record and pixels, and of its exact-mixed view with the next sample."""
    out = {}
    for name, (spec, count, size, mode) in SPECS.items():
        images = [source_image(i, size, mode) for i in range(count)]
        keys = [f"{name}_{i:03d}" for i in range(count)]
        rows = []
        for view in range(VIEWS):
            own = []
            for key, image in zip(keys, images):
                params = sample_view(spec, SEED, key, view)
                own.append((params, params.encode(spec), apply_view(spec, image, params)))
            for i, key in enumerate(keys):
                partner = (i + 1) % count
                params, record, pixels = own[i]
                mix = sample_mix(spec, SEED, key, view, i, partner)
                mixed = mix_views(pixels, own[partner][2], mix) if mix.kind else pixels
                full = np.concatenate([record, mix.encode()])
                rows.append({"key": key, "view": view, "params": zlib.crc32(record.tobytes()),
                             "pixels": pixel_digest(pixels), "mixed_params": zlib.crc32(full.tobytes()),
                             "mixed_pixels": pixel_digest(mixed), "mix_kind": mix.kind,
                             "ops": [op for op, _ in params.ops], "erase": params.erase is not None})
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"(re)write {GOLDEN_PATH}")
    args = parser.parse_args()
    golden = {"view_code": VIEW_CODE, "seed": SEED, "views": render_golden()}
    if args.write:
        with open(GOLDEN_PATH, "w") as f:
            json.dump(golden, f, indent=1)
            f.write("\n")
        print(f"wrote {GOLDEN_PATH}")
    else:
        print(json.dumps(golden))


if __name__ == "__main__":
    main()
