"""Student training: config -> checks -> data + cached (or live, or no) teachers -> ``engine.fit`` -> checkpoint.

Teachers are picked by *name* from the cache and mapped to tokens: ``kd.conv_teacher`` feeds the conv token
(λ1, τ1), ``kd.inv_teacher`` the inv token (λ2, τ2).  Either may be empty, and the names need not match their
kind, so one command line covers the paper's ablations:

    no KD            kd.mode=none                                         heads: cls
    conv only        --conv-teacher regnet                                heads: cls, conv
    inv only         --inv-teacher rednet                                 heads: cls, inv
    CiT              --conv-teacher regnet --inv-teacher rednet           heads: cls, conv, inv
    same-kind pair   --conv-teacher regnet --inv-teacher resnet           (two conv teachers on the two tokens)
    one token        ... kd.shared_token=true                             heads: cls (labels and teachers)

``kd.mode``: ``cached`` (default) joins each view with its cached top-k and never builds a teacher;
``online`` replays the same views and runs the teachers live from their checkpoints (the parity and speed
reference); ``none`` trains on labels only.  Everything that can be wrong with the inputs is checked before
the first step.

The student is a CiT or any timm model with one linear head per term (``shared.models.students``); the recipe
(``[objective]``: Eq. 1, one-head KD, hard distillation, weight schedules) is an objective over a target source
(cached, online, none) — ``trainer.objectives``, ``trainer.targets``; the config lives in ``trainer.config``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from shared.augment import to_model_input
from shared.cache_schema import CacheError, LogitCache, TeacherRecord
from shared.config import ConfigError
from shared.manifest import Manifest, check_shards
from shared.subset import cache_rows
from trainer.config import (KD_MODES, SECTIONS, KDConfig, ObjectiveConfig, RunConfig, StudentConfig,  # noqa: F401
                            load_run_config, read_config_file)
from trainer.data import DataError, EvalViews, TrainViews, check_cache, check_views, make_loader, warn_provenance
from trainer.engine import CheckpointError, FitResult, Runtime, claim_out, evaluate, fit, setup_runtime, write_json
from trainer.losses import CiTLoss, KDTerm, TargetModel
from trainer.objectives import (CiTObjective, FeatureStudent, Objective, ObjectiveSpec, WeightSchedule,
                                build_objective, model_outputs)
from trainer.targets import CachedSource, NoSource, OnlineSource

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------------------------------------------
# Models

def student_heads(cfg: RunConfig) -> tuple[str, ...]:
    if cfg.student.heads:
        return tuple(cfg.student.heads)
    if cfg.kd.shared_token or cfg.objective.recipe == "kd":     # one-head KD distils into the class head
        return ("cls",)
    return ("cls",) + tuple(slot for slot, _ in cfg.kd.slots())


def build_student(cfg: RunConfig, num_classes: int, in_chans: int) -> nn.Module:
    """A CiT, a registered timm student, or ``student:<timm name>``; a bare timm name is taken as the latter."""
    from shared import models
    arch = cfg.student.arch
    if not models.is_model(arch):
        raise ConfigError(f"student.arch={arch!r}: " + models._unknown(arch))
    if models.model_kind(arch) != "student":
        arch = models.STUDENT_PREFIX + arch.removeprefix("timm:")
        if not models.is_model(arch):
            raise ConfigError(f"student.arch={cfg.student.arch!r} is a teacher builder, not a student: use a CiT, "
                              f"{', '.join(n for n in models.list_models() if n.endswith('_student'))} or any timm "
                              "model name")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=cfg.augment.image_size,
                  heads=student_heads(cfg), drop_path_rate=cfg.student.drop_path_rate, **cfg.student.options)
    if models.is_token_student(arch):
        kwargs["token_mode"] = cfg.student.token_mode
    return models.create_model(arch, **kwargs)


def kd_terms(cfg: RunConfig, heads: tuple[str, ...]) -> list[KDTerm]:
    """The KD terms of Eq. 1 in use, each mapped to its student head."""
    weights = {"conv": (cfg.loss.lambda1, cfg.loss.tau1), "inv": (cfg.loss.lambda2, cfg.loss.tau2)}
    terms = []
    for slot, teacher in cfg.kd.slots():
        head = "cls" if cfg.kd.shared_token or cfg.objective.recipe == "kd" else slot
        if head not in heads:
            raise ConfigError(f"kd.{slot}_teacher={teacher!r} needs a {head!r} head but the student has {heads}; "
                              f"drop student.heads or add {head!r}, or set kd.shared_token=true")
        terms.append(KDTerm(slot, head, teacher, *weights[slot]))
    return terms


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnlineTeachers(nn.Module):
    """The reference for parity and speed: teachers run live (eval, no grad, their own input size and
    normalisation). ``norms[name]`` = (mean, std[, input_size, interpolation]), as ``teacher_input`` takes them."""

    def __init__(self, teachers: dict[str, nn.Module], norms: dict[str, tuple]):
        super().__init__()
        self.teachers = nn.ModuleDict(teachers)
        self.norms = norms

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        from shared.models.normalize import teacher_input
        return {name: model_outputs(t(teacher_input(views, *self.norms[name])))["cls"].float()
                for name, t in self.teachers.items()}

    @torch.no_grad()
    def with_features(self, views: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({name: logits}, {name: pooled features}), float32, from one pass of each teacher (as the builder)."""
        from shared.features import logits_and_pooled
        from shared.models.normalize import teacher_input
        logits, features = {}, {}
        for name, t in self.teachers.items():
            z, f = logits_and_pooled(t, teacher_input(views, *self.norms[name]))
            logits[name], features[name] = z.float(), f.float()
        return logits, features


def load_online_teachers(cfg: RunConfig, records: dict[str, TeacherRecord | None], num_classes: int,
                         in_chans: int, device: torch.device) -> OnlineTeachers:
    """Teachers from ``kd.checkpoints`` (or the path the cache recorded); their sha256 must match the cache's."""
    from shared import checkpoint
    teachers, norms = {}, {}
    for _, name in cfg.kd.slots():
        record = records.get(name)
        path = cfg.kd.checkpoints.get(name) or (record.extra.get("checkpoint") if record else None)
        if not path:
            raise ConfigError(f"kd.mode=online needs teacher {name!r}'s checkpoint: set kd.checkpoints.{name}=PATH")
        if not os.path.exists(path):
            raise ConfigError(f"checkpoint of teacher {name!r} not found: {path}")
        if record is not None and record.checkpoint_sha256 and file_sha256(path) != record.checkpoint_sha256:
            raise CacheError(f"checkpoint {path} is not the teacher {name!r} the cache was built with "
                             f"(sha256 differs from {record.checkpoint_sha256[:12]}…)")
        model, meta = checkpoint.load_checkpoint(path, expect_classes=num_classes, expect_in_chans=in_chans)
        teachers[name] = model.eval().requires_grad_(False)
        mean = meta.get("mean") or (record.mean if record else None)
        std = meta.get("std") or (record.std if record else None)
        norms[name] = (tuple(mean), tuple(std), *meta.resize_for(cfg.augment.image_size))
    return OnlineTeachers(teachers, norms).to(device)


# -----------------------------------------------------------------------------------------------------------------
# The run

@dataclass
class Prepared:
    """Everything ``train`` checked and built before the first step (also what benchmarks reuse)."""
    cfg: RunConfig
    runtime: Runtime
    manifest: Manifest
    train_set: TrainViews
    student: nn.Module
    loss_fn: "StudentStep"
    teachers: OnlineTeachers | None
    eval_fn: object
    views: int
    run_meta: dict


def prepare(cfg: RunConfig, runtime: Runtime | None = None) -> Prepared:
    """Validate the inputs and build data, student and loss; raises (ConfigError, CacheError, DataError) first."""
    runtime = runtime or setup_runtime(cfg.train.device)
    if not cfg.data.train:
        raise ConfigError("no training data: pass --data MANIFEST (data.train)")
    manifest = Manifest.load(cfg.data.train)
    manifest.require_channels()
    check_shards(manifest, sha256=cfg.data.verify_shards)    # before any step: a missing shard fails here, not mid-run
    num_classes = manifest.num_classes
    slots = cfg.kd.slots()
    if cfg.kd.mode == "none" and (cfg.kd.conv_teacher or cfg.kd.inv_teacher):
        warnings.warn("kd.mode=none: the configured teachers are ignored", stacklevel=2)
    if cfg.kd.mode != "none" and not slots:
        raise ConfigError(f"kd.mode={cfg.kd.mode} but no teacher is mapped: pass --conv-teacher and/or "
                          "--inv-teacher (or --kd none)")
    if cfg.kd.mode == "cached" and not cfg.data.cache:
        raise ConfigError("kd.mode=cached needs a logit cache: pass --cache URL (data.cache)")
    teacher_names = [name for _, name in slots]
    records: dict[str, TeacherRecord | None] = {name: None for name in teacher_names}
    views, cache_attrs, features = cfg.data.views, None, cfg.objective.uses_features
    if cfg.data.cache:
        cache_attrs = LogitCache.open(cfg.data.cache).attrs
        relation = cache_rows(manifest, cache_attrs.dataset_fingerprint, cfg.data.cache_data)   # subset: row map
        check_cache(cache_attrs, relation.cache_manifest, cfg.augment, cfg.data.view_seed, teacher_names, num_classes,
                    cfg.data.cache)
        warn_provenance(cache_attrs, cfg.data.cache, cfg.data.verify_views)
        records = {name: cache_attrs.teacher(name) for name in teacher_names}
        warn_kind_mismatch(cfg.kd, records)
        if cfg.loss.topk > cache_attrs.topk:
            raise ConfigError(f"loss.topk={cfg.loss.topk} but the cache {cfg.data.cache} holds only "
                              f"K={cache_attrs.topk} classes per view")
        if views and views > cache_attrs.views:
            raise DataError(f"data.views={views} but the cache has only E={cache_attrs.views} views")
        views = views or cache_attrs.views
    check_views(cfg.train.epochs, views, cfg.data.allow_repeat_views)
    in_chans = _channels(manifest, cfg)
    heads = student_heads(cfg)
    terms = kd_terms(cfg, heads)
    if features:
        check_feature_terms(cfg, cache_attrs)

    torch.manual_seed(cfg.train.seed)               # the student's initial weights depend on the seed only
    student = build_student(cfg, num_classes, in_chans)
    cached = cfg.kd.mode == "cached"
    train_set = TrainViews(manifest, cfg.augment, cfg.data.view_seed, views, seed=cfg.train.seed,
                           shuffle=cfg.data.shuffle, cache_url=cfg.data.cache,
                           teachers=tuple(teacher_names) if cached else (), verify=cfg.data.verify_views,
                           rank=runtime.rank, world=runtime.world,
                           row_map=relation.rows if cfg.data.cache else None,
                           features=cached and features)
    temperatures = cache_attrs.temperatures if cached else None
    cache_topk = cache_attrs.topk if cache_attrs else 0
    steps = max(train_set.num_batches(cfg.train.batch_size, cfg.data.num_workers, rank=r)
                for r in range(runtime.world)) * cfg.train.epochs
    schedule = WeightSchedule(cfg.objective.schedule, cfg.objective.final, steps)
    objective = make_objective(cfg, ObjectiveSpec(cfg, terms, num_classes, temperatures, cache_topk, schedule))
    target_model = TargetModel(cfg.loss, num_classes, temperatures, cache_topk)
    if cfg.objective.recipe == "kd" and cfg.kd.mode != "none":
        target_model.warn_if_not_cached(cfg.objective.tau, "objective.tau")
    teachers = None
    dims = ()
    if cfg.kd.mode == "online":
        teachers = load_online_teachers(cfg, records, num_classes, in_chans, runtime.device)
        source = OnlineSource(teachers, target_model, features)
        if features:
            dims = tuple(online_feature_dim(teachers, name) for name in teacher_names)
    elif cached:
        dims = tuple(records[name].feature_dim for name in teacher_names) if features else ()
        source = CachedSource(tuple(teacher_names), target_model, dims)
    else:
        source = NoSource(target_model)
    if features:       # the projections train, checkpoint and resume with the student
        torch.manual_seed(cfg.train.seed + 1)
        student = FeatureStudent(student, [(t.teacher, t.head, dims[teacher_names.index(t.teacher)]) for t in terms],
                                 project=cfg.objective.feature_weight > 0)
    loss_fn = StudentStep(objective, source, tuple(cfg.augment.mean), tuple(cfg.augment.std))
    mean, std = cfg.augment.mean, cfg.augment.std
    eval_fn = None
    if cfg.data.test:
        test = Manifest.load(cfg.data.test)
        if test.num_classes != num_classes:
            raise DataError(f"test set {cfg.data.test} has {test.num_classes} classes, the training set {num_classes}")
        if test.require_channels() != in_chans:
            raise DataError(f"test set {cfg.data.test} has {test.channels}-channel images, the training set {in_chans}")
        check_shards(test, sha256=cfg.data.verify_shards)
        test_set = EvalViews(test, cfg.augment, runtime.rank, runtime.world)
        eval_fn = make_eval_fn(test_set, cfg, runtime, mean, std)
    run_meta = {"config": cfg.to_dict(), "dataset_fingerprint": manifest.fingerprint, "views": views,
                "heads": list(heads), "num_classes": num_classes, "in_chans": in_chans,
                "trained_heads": sorted(objective.heads),
                **({"cache_rows": relation.record()} if cfg.data.cache else {})}
    return Prepared(cfg, runtime, manifest, train_set, student, loss_fn, teachers, eval_fn, views, run_meta)


def check_feature_terms(cfg: RunConfig, cache_attrs) -> None:
    """Feature / relation KD needs teachers, views the teachers saw as they are, and (cached) stored features."""
    what = "objective.feature_weight / objective.relation_weight"
    if cfg.kd.mode == "none":
        raise ConfigError(f"{what}: kd.mode=none has no teacher to take features from; set the weights to 0 or "
                          "map a teacher")
    if cfg.augment.mix == "approx":
        raise ConfigError(f"{what}: teacher features are not defined with augment.mix=approx (the batch is mixed "
                          "after the teachers saw its views); use augment.mix=exact or off")
    if cfg.kd.mode == "cached" and not cache_attrs.features:
        raise CacheError(f"cache {cfg.data.cache} stores no teacher features, which {what} need: rebuild it with "
                         "`cit cache build ... --features pooled --force` (or use kd.mode=online)")


def online_feature_dim(teachers: OnlineTeachers, name: str) -> int:
    from shared.features import FeatureError, feature_dim
    try:
        return feature_dim(teachers.teachers[name])
    except FeatureError as exc:
        raise ConfigError(f"teacher {name!r} has no pooled features for feature / relation KD: {exc}") from None


def make_objective(cfg: RunConfig, spec: ObjectiveSpec) -> Objective:
    """The configured recipe; without teachers (``kd.mode=none``) every recipe is the labels-only CE (λ0)."""
    if cfg.kd.mode == "none":
        if cfg.objective.recipe != "cit":
            warnings.warn(f"kd.mode=none: objective.recipe={cfg.objective.recipe} has no teacher; training on the "
                          "labels only (λ0·CE)", stacklevel=3)
        return CiTObjective(CiTLoss(cfg.loss, [], spec.num_classes))
    return build_objective(spec)


@dataclass
class StudentStep:
    """The engine's ``loss_fn``: the student's heads on the batch's views, fitted by the objective to what the
    target source makes of the batch.  ``parts`` stay device tensors (the engine decides when to sync)."""
    objective: Objective
    source: object                    # CachedSource | OnlineSource | NoSource
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, model: nn.Module, batch, step: int = 0) -> tuple[torch.Tensor, dict]:
        outputs = model_outputs(model(to_model_input(batch.views, self.mean, self.std)))
        loss, parts = self.objective(outputs, self.source(batch), step)
        parts["acc"] = (outputs["cls"].detach().argmax(1) == batch.labels).float().mean()
        return loss, parts


def warn_kind_mismatch(kd: KDConfig, records: dict[str, TeacherRecord | None]) -> None:
    """An involution teacher on the conv token (or the reverse) is allowed — the same-kind ablations need it — but
    is more often a swapped command line than a plan: say so, once, before training."""
    for slot, name in kd.slots():
        kind = getattr(records.get(name), "kind", None)
        if kind in ("conv", "inv") and kind != slot:
            log.warning("warning: teacher %r is a %s teacher but feeds the %s token (kd.%s_teacher, --%s-teacher); "
                        "swap --conv-teacher and --inv-teacher if that is not intended", name, kind, slot, slot, slot)


def _channels(manifest: Manifest, cfg: RunConfig) -> int:
    """Image channels: the manifest's (every image is decoded to them), a contract checked before anything runs."""
    return manifest.require_channels()


def eval_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both inference outputs the design asks for: the class head and the mean of the heads (official code)."""
    if hasattr(model, "forward_heads"):
        heads = model_outputs(model.forward_heads(x))
        out = {"cls": heads["cls"]}
        if len(heads) > 1:
            out["mean"] = torch.stack(list(heads.values())).mean(0)
        return out
    return {"cls": model_outputs(model(x))["cls"]}


def make_eval_fn(test_set: EvalViews, cfg: RunConfig, runtime: Runtime, mean, std):
    loader = make_loader(test_set, cfg.train.batch_size * 2, cfg.data.num_workers,
                         pin_memory=runtime.device.type == "cuda")

    def eval_fn(model: nn.Module) -> dict:
        model.eval()
        return evaluate(lambda views: eval_outputs(model, to_model_input(views, mean, std)), loader, runtime)

    return eval_fn


RESUME_FREE = {("train", "epochs"), ("train", "progress"), ("train", "log_interval"), ("train", "debug_rows"),
               ("train", "debug_kill_at_step"), ("data", "num_workers"), ("train", "device")}


def check_same_run(current: dict, stored: dict) -> None:
    """Resuming with a different run config (other than epochs / logging / workers) is an error naming the keys."""
    old, new = stored.get("config", {}), json.loads(json.dumps(current.get("config", {})))   # tuples -> lists
    for name in set(new) & set(SECTIONS):     # sections / keys added after the run started: it ran with defaults
        old = old | {name: json.loads(json.dumps(asdict(SECTIONS[name]()))) | old.get(name, {})}
    differ = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {new.get(s, {}).get(k)!r}"
              for s in sorted(set(old) | set(new)) for k in sorted(set(old.get(s, {})) | set(new.get(s, {})))
              if (s, k) not in RESUME_FREE and old.get(s, {}).get(k) != new.get(s, {}).get(k)]
    if differ:
        raise CheckpointError("cannot resume: the run's config differs from the checkpoint's: " + "; ".join(differ))


def train(cfg: RunConfig, out_dir: str, resume: bool = False, force: bool = False) -> FitResult:
    """Train a student as configured; writes ``out_dir/{state.safetensors,metrics.jsonl,student.*}``.  A folder
    holding a run is continued with ``resume`` or replaced with ``force``, never silently overwritten."""
    claim_out(out_dir, [os.path.join(out_dir, "run.json"), os.path.join(out_dir, "student.safetensors")],
              resume=resume, force=force, main=int(os.environ.get("RANK", 0)) == 0)
    p = prepare(cfg)
    result = fit(p.student, p.loss_fn, p.train_set, cfg.train, p.runtime, out_dir,
                 num_workers=cfg.data.num_workers, eval_fn=p.eval_fn, resume=resume, run_meta=p.run_meta,
                 check_resume=lambda stored: check_same_run(p.run_meta, stored),
                 find_unused_parameters=bool(set(p.run_meta["heads"]) - set(p.run_meta["trained_heads"])))
    if p.runtime.main:
        save_student(result, p, out_dir)
    return result


def save_student(result: FitResult, p: Prepared, out_dir: str) -> None:
    """The trained student as a ``shared.checkpoint`` model checkpoint, for ``cit eval`` and friends."""
    from shared import checkpoint
    last = result.history[-1] if result.history else {}
    meta = {"arch": p.cfg.student.arch, "kind": "student", "num_classes": p.manifest.num_classes,
            "in_chans": p.run_meta["in_chans"], "mean": list(p.cfg.augment.mean), "std": list(p.cfg.augment.std),
            "test_accuracy": last.get("test_acc_cls"),
            "kd": asdict(p.cfg.kd), "augment": p.cfg.augment.to_dict(), "dataset_fingerprint": p.manifest.fingerprint}
    model = result.model.student if isinstance(result.model, FeatureStudent) else result.model
    checkpoint.save_checkpoint(model, os.path.join(out_dir, "student.safetensors"), meta)
    write_json(os.path.join(out_dir, "run.json"), p.run_meta | {"final": last})
