"""``cit teacher train``: train a conv or involution teacher with the student's loop (``engine.fit``).

Teachers train on the same replayable augmentation as everything else (view = epoch mod E', or with
``data.views = 0`` a fresh view every epoch — the default: a teacher should not overfit to few views), plain
label-smoothed cross-entropy, and are evaluated on the test split after every epoch.  The result is saved with
``shared.checkpoint.save_checkpoint`` including the measured test accuracy, the input normalisation and the kind,
which is what ``cit cache build`` records in the cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.augment import to_model_input
from shared.config import ConfigError
from shared.manifest import Manifest
from trainer.data import EvalViews, TrainViews, check_views
from trainer.engine import FitResult, claim_out, evaluate, fit, setup_runtime
from trainer.data import make_loader
from trainer.train import RunConfig, _channels, model_outputs

KINDS = ("conv", "inv", "other")
# Overrides the demo and the benchmarks train their small CNN teachers with: a fresh view every epoch, and more,
# larger steps than the student's batch 64 / lr 1e-3 (measured on low-data Fashion-MNIST: 26% -> 68% in 10 epochs)
CNN_TEACHER_RECIPE = ("data.views=0", "train.batch_size=32", "train.lr=3e-3")


@dataclass
class TeacherSpec:
    """What teacher to train and where it goes (the rest comes from the run config's [train] [augment] [data])."""
    arch: str
    kind: str
    data: str
    test_data: str
    out: str                      # checkpoint path; the training state lives in ``<out>.run/``
    options: dict | None = None   # further create_model keywords (e.g. a small-input stem)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"teacher kind must be one of {KINDS}, got {self.kind!r}")


def build_teacher(spec: TeacherSpec, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """timm CNNs get the small-input stem by default on images up to 64 px (a 224-px stem would cut a 28-px
    image to 7x7 before the first block)."""
    from shared import models
    options = dict(spec.options or {})
    if models.model_kind(spec.arch) == "conv":
        options.setdefault("small_input", img_size <= 64)
    return models.create_model(spec.arch, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **options)


def train_teacher(spec: TeacherSpec, cfg: RunConfig, resume: bool = False, force: bool = False) -> FitResult:
    """Train, evaluate each epoch, save ``spec.out`` (+ sidecar) with the final test accuracy.  An existing
    checkpoint or training state at ``spec.out`` needs ``resume`` or ``force`` (never overwritten silently)."""
    claim_out(spec.out + ".run", [spec.out], resume=resume, force=force, main=int(os.environ.get("RANK", 0)) == 0)
    runtime = setup_runtime(cfg.train.device)
    manifest = Manifest.load(spec.data)
    test = Manifest.load(spec.test_data)
    if test.num_classes != manifest.num_classes:
        raise ConfigError(f"test set {spec.test_data} has {test.num_classes} classes, training set "
                          f"{manifest.num_classes}")
    check_views(cfg.train.epochs, cfg.data.views, cfg.data.allow_repeat_views)
    in_chans = _channels(manifest, cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_teacher(spec, manifest.num_classes, in_chans, cfg.augment.image_size)
    mean, std, smoothing = cfg.augment.mean, cfg.augment.std, cfg.loss.label_smoothing

    def loss_fn(m: nn.Module, batch, step: int = 0) -> tuple[torch.Tensor, dict]:
        logits = model_outputs(m(to_model_input(batch.views, mean, std)))["cls"]
        loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=smoothing)
        acc = (logits.detach().argmax(1) == batch.labels).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}

    train_set = TrainViews(manifest, cfg.augment, cfg.data.view_seed, cfg.data.views, seed=cfg.train.seed,
                           shuffle=cfg.data.shuffle, rank=runtime.rank, world=runtime.world)
    test_loader = make_loader(EvalViews(test, cfg.augment, runtime.rank, runtime.world), cfg.train.batch_size * 2,
                              cfg.data.num_workers, pin_memory=runtime.device.type == "cuda")

    def eval_fn(m: nn.Module) -> dict:
        m.eval()
        return evaluate(lambda views: {"cls": model_outputs(m(to_model_input(views, mean, std)))["cls"]},
                        test_loader, runtime)

    run_meta = {"config": cfg.to_dict(), "teacher": {"arch": spec.arch, "kind": spec.kind,
                                                     "options": spec.options or {}}}
    result = fit(model, loss_fn, train_set, cfg.train, runtime, spec.out + ".run", num_workers=cfg.data.num_workers,
                 eval_fn=eval_fn, resume=resume, run_meta=run_meta)
    if runtime.main:
        from shared import checkpoint
        accuracy = result.history[-1].get("test_acc_cls") if result.history else None
        meta = {"arch": spec.arch, "kind": spec.kind, "num_classes": manifest.num_classes, "in_chans": in_chans,
                "mean": list(mean), "std": list(std), "test_accuracy": accuracy,
                "augment": cfg.augment.to_dict(), "dataset_fingerprint": manifest.fingerprint,
                "test_fingerprint": test.fingerprint}
        os.makedirs(os.path.dirname(os.path.abspath(spec.out)), exist_ok=True)
        checkpoint.save_checkpoint(result.model.eval(), spec.out, meta)
    return result
