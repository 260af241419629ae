"""Helpers for the trainer tests: a real logit cache written through ``shared.cache_schema`` with real teacher
logits computed here (the trainer never imports the cache builder)."""
from __future__ import annotations

import numpy as np
import torch

from shared.augment import ViewSpec, to_model_input
from shared.cache_schema import STATUS_COMPLETE, CacheAttrs, LogitCache, TeacherRecord, TopK
from shared.manifest import Manifest
from shared.reader import pieces_for_rows, read_piece
from shared.targets import encode_logits
from shared.views import VIEW_CODE, LoadedRows, make_renderer, pixel_digest


def teacher_outputs(model: torch.nn.Module, views: torch.Tensor, mean, std) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(to_model_input(views, mean, std))
    return (out["cls"] if isinstance(out, dict) else out).float()


def build_cache(url: str, manifest: Manifest, spec: ViewSpec, seed: int, views: int,
                teachers: dict[str, dict], topk: int, chunk_rows: int = 16,
                temperatures: tuple[float, ...] = (1.0,)) -> LogitCache:
    """``teachers``: name -> {"model", "kind", "mean", "std", "sha256"}.  Writes every (view, chunk) unit with the
    builder's encoding (``shared.targets.encode_logits``) of the teachers' full logits."""
    records = [TeacherRecord(name, t.get("kind", "conv"), t.get("arch", "test"), t.get("sha256", ""),
                             manifest.num_classes, list(t["mean"]), list(t["std"]), None,
                             {"checkpoint": t["checkpoint"]} if t.get("checkpoint") else {})
               for name, t in teachers.items()]
    attrs = CacheAttrs(manifest.fingerprint, manifest.num_samples, manifest.num_classes, views, topk, seed,
                       spec.to_dict(), chunk_rows, records, temperatures=list(temperatures),
                       view_code=dict(VIEW_CODE))
    cache = LogitCache.create(url, attrs, spec.num_params)
    renderer = make_renderer(spec, seed, manifest)
    for v in range(views):
        for chunk in range(attrs.num_chunks):
            lo, hi = attrs.chunk_rows_range(chunk)
            a, z = renderer.rows_to_load(lo, hi)      # exact mixing: plus the partners' pairing windows
            rows = LoadedRows([s for p in pieces_for_rows(manifest, a, z) for s in read_piece(manifest, p)])
            rendered = [(r.pixels, r.params) for r in (renderer.render(v, rows, row) for row in range(lo, hi))]
            images = torch.stack([r[0] for r in rendered])
            params = np.stack([r[1] for r in rendered])
            outputs = {}
            for name, t in teachers.items():
                logits = teacher_outputs(t["model"], images, t["mean"], t["std"])
                outputs[name] = TopK.from_float(*encode_logits(logits, topk, temperatures), manifest.num_classes)
            digests = np.asarray([pixel_digest(r[0]) for r in rendered], dtype=np.uint32)
            cache.write_unit(v, chunk, params, outputs, digests=digests)
    cache.set_status(STATUS_COMPLETE)
    return LogitCache.open(url)
