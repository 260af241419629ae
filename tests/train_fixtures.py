"""Helpers for the trainer tests: a real logit cache written through ``shared.cache_schema`` with real teacher
logits computed here (the trainer never imports the cache builder)."""
from __future__ import annotations

import numpy as np
import torch

from shared.augment import ViewSpec, to_model_input
from shared.cache_schema import STATUS_COMPLETE, CacheAttrs, LogitCache, TeacherRecord, TopK, create_arrays, open_root
from shared.manifest import Manifest
from shared.reader import pieces_for_rows, read_piece
from shared.views import render_view


def teacher_outputs(model: torch.nn.Module, views: torch.Tensor, mean, std) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(to_model_input(views, mean, std))
    return (out["cls"] if isinstance(out, dict) else out).float()


def build_cache(url: str, manifest: Manifest, spec: ViewSpec, seed: int, views: int,
                teachers: dict[str, dict], topk: int, chunk_rows: int = 16) -> LogitCache:
    """``teachers``: name -> {"model", "kind", "mean", "std", "sha256"}.  Writes every (view, chunk) unit."""
    records = [TeacherRecord(name, t.get("kind", "conv"), t.get("arch", "test"), t.get("sha256", ""),
                             manifest.num_classes, list(t["mean"]), list(t["std"]), None,
                             {"checkpoint": t["checkpoint"]} if t.get("checkpoint") else {})
               for name, t in teachers.items()]
    attrs = CacheAttrs(manifest.fingerprint, manifest.num_samples, manifest.num_classes, views, topk, seed,
                       spec.to_dict(), chunk_rows, records)
    root = open_root(url, "w")
    create_arrays(root, attrs, spec.num_params)
    root.attrs.update(attrs.to_json_dict())
    cache = LogitCache(root, attrs)
    for v in range(views):
        for chunk in range(attrs.num_chunks):
            lo, hi = attrs.chunk_rows_range(chunk)
            samples = [s for p in pieces_for_rows(manifest, lo, hi) for s in read_piece(manifest, p)]
            rendered = [render_view(spec, seed, v, s) for s in samples]
            images = torch.stack([r[0] for r in rendered])
            params = np.stack([r[1] for r in rendered])
            outputs = {}
            for name, t in teachers.items():
                logits = teacher_outputs(t["model"], images, t["mean"], t["std"])
                top = logits.topk(topk, dim=1)
                outputs[name] = TopK(top.values.half().numpy(), top.indices.numpy().astype(np.uint8),
                                     torch.logsumexp(logits, 1).numpy().astype(np.float32))
            cache.write_unit(v, chunk, params, outputs)
    root.attrs["status"] = STATUS_COMPLETE
    return LogitCache.open(url)


# -----------------------------------------------------------------------------------------------------------------
# Tiny models for the mechanics tests (a stand-in until / besides shared.models' real ones)

class TinyNet(torch.nn.Module):
    """A few-thousand-parameter CNN with named heads; train mode returns {head: logits}, eval the class head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, heads=("cls",), **_):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(in_chans, 8, 3, 2), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
                                        torch.nn.Conv2d(8, 16, 3, 2), torch.nn.GELU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.token = torch.nn.Parameter(torch.zeros(16))
        self.heads = torch.nn.ModuleDict({h: torch.nn.Linear(16, num_classes) for h in heads})

    def no_weight_decay(self):
        return {"token"}

    def forward_heads(self, x):
        z = self.stem(x) + self.token
        return {h: m(z) for h, m in self.heads.items()}

    def forward(self, x):
        out = self.forward_heads(x)
        return out if self.training else out["cls"]


def tiny_create_model(name: str, **kwargs) -> torch.nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans", "heads")}
    return TinyNet(**kwargs)


def install_tiny_models() -> None:
    """Make ``shared.models.create_model`` build ``TinyNet`` (for subprocess runs of the CLI in tests)."""
    import importlib
    models = importlib.import_module("shared.models")
    models.create_model = tiny_create_model
    try:
        importlib.import_module("shared.checkpoint")
    except ImportError:   # TEMP until shared/checkpoint.py lands
        import sys
        import types
        import shared
        stub = types.ModuleType("shared.checkpoint")
        stub.save_checkpoint = lambda model, path, meta: torch.save(model.state_dict(), path)
        sys.modules["shared.checkpoint"] = shared.checkpoint = stub


if __name__ == "__main__":   # python -m tests.train_fixtures train ...: the CLI with tiny models
    import click
    install_tiny_models()
    from trainer.cli import teacher, train
    click.Group(commands={"train": train, "teacher": teacher})()
