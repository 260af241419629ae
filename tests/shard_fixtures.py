"""Small real shards + manifest made by the tests (no downloads): random 28x28 grey images, 10 classes."""
from __future__ import annotations

import os

import numpy as np

from shared.manifest import Manifest, ShardInfo, file_sha256
from shared.shards import ShardWriter, encode_png


def make_shards(folder: str, num_samples: int = 100, shard_size: int = 30, num_classes: int = 10,
                size: int = 28, channels: int = 1, seed: int = 0, prefix: str = "s") -> Manifest:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ShardWriter(os.path.join(folder, f"{prefix}-%04d.tar"), shard_size) as writer:
        for i in range(num_samples):
            shape = (size, size) if channels == 1 else (size, size, channels)
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            writer.write({"__key__": f"{prefix}_{i:06d}", "png": encode_png(image), "cls": str(i % num_classes)})
    shards = [ShardInfo(os.path.basename(w.path), w.samples, file_sha256(w.path), size=os.path.getsize(w.path))
              for w in writer.written]
    manifest = Manifest(shards, num_classes, [f"c{c}" for c in range(num_classes)], name=prefix,
                        channels=1 if channels == 1 else 3)
    manifest.save(os.path.join(folder, f"{prefix}.json"))
    return manifest
