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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from shared.augment import ViewSpec, to_model_input
from shared.cache_schema import CacheError, LogitCache, TeacherRecord
from shared.config import ConfigError, check_fields, load_config, section, set_dotted
from shared.manifest import Manifest, check_shards
from shared.subset import cache_rows
from trainer.data import (DataConfig, DataError, EvalViews, TrainViews, check_cache, check_views, make_loader,
                          warn_provenance)
from trainer.engine import (CheckpointError, FitResult, Runtime, TrainConfig, claim_out, evaluate, fit,
                            setup_runtime, write_json)
from trainer.losses import CiTLoss, KDTerm, LossConfig, MixInfo

KD_MODES = ("cached", "online", "none")
log = logging.getLogger(__name__)


@dataclass
class StudentConfig:
    """``[student]``: which student, and its options (passed to ``shared.models.create_model``)."""
    arch: str = "cit_nano"
    token_mode: str = "align"            # align | random: how the conv/inv tokens are made (official: align)
    heads: tuple[str, ...] = ()          # () = derived from [kd]: cls + one head per KD slot in use
    drop_path_rate: float = 0.0
    options: dict = field(default_factory=dict)    # any further create_model keyword


@dataclass
class KDConfig:
    """``[kd]``: distillation mode and which cached teacher feeds which token."""
    mode: str = "cached"                 # cached | online | none
    conv_teacher: str = ""               # teacher name in the cache -> conv token (λ1, τ1)
    inv_teacher: str = ""                # teacher name in the cache -> inv token (λ2, τ2)
    shared_token: bool = False           # one-token variant: every term on the class head
    checkpoints: dict = field(default_factory=dict)   # online mode: teacher name -> checkpoint path

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise ValueError(f"kd.mode must be one of {KD_MODES}, got {self.mode!r}")

    def slots(self) -> list[tuple[str, str]]:
        """(slot, teacher name) for the KD terms in use."""
        if self.mode == "none":
            return []
        return [(slot, name) for slot, name in (("conv", self.conv_teacher), ("inv", self.inv_teacher)) if name]


@dataclass
class RunConfig:
    data: DataConfig
    augment: ViewSpec
    student: StudentConfig
    train: TrainConfig
    kd: KDConfig
    loss: LossConfig

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "augment": self.augment.to_dict(), "student": asdict(self.student),
                "train": asdict(self.train), "kd": asdict(self.kd), "loss": asdict(self.loss)}


SECTIONS = {"data": DataConfig, "student": StudentConfig, "train": TrainConfig, "kd": KDConfig, "loss": LossConfig}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A TOML config; a top-level ``extends = "base.toml"`` (relative to the file) is loaded first and
    overlaid, so ablation configs state only what they change."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"config {path} extends itself (via {' -> '.join(_seen)})")
    cfg = load_config(path)
    base = cfg.pop("extends", None)
    if base is None:
        return cfg
    return _merge(read_config_file(os.path.join(os.path.dirname(path), base), _seen + (path,)), cfg)


def load_run_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A TOML file (sections [data] [augment] [student] [train] [kd] [loss]) plus ``section.key=value`` overrides."""
    cfg = read_config_file(path) if path else {}
    for item in overrides:
        set_dotted(cfg, item)
    unknown = sorted(set(cfg) - set(SECTIONS) - {"augment"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(SECTIONS) + ['augment']}")
    try:
        augment = ViewSpec.from_dict(check_fields(cfg.get("augment", {}), "augment", ViewSpec))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[augment]: {exc}") from None
    return RunConfig(augment=augment, **{name: section(cfg, name, cls) for name, cls in SECTIONS.items()})


# -----------------------------------------------------------------------------------------------------------------
# Models

def model_outputs(out) -> dict[str, torch.Tensor]:
    """Normalise a model's training output to {head: logits} (a teacher returns one tensor: its ``cls``)."""
    if isinstance(out, dict):
        return out
    if isinstance(out, torch.Tensor):
        return {"cls": out}
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor or a dict of head logits")


def student_heads(cfg: RunConfig) -> tuple[str, ...]:
    if cfg.student.heads:
        return tuple(cfg.student.heads)
    if cfg.kd.shared_token:
        return ("cls",)
    return ("cls",) + tuple(slot for slot, _ in cfg.kd.slots())


def build_student(cfg: RunConfig, num_classes: int, in_chans: int) -> nn.Module:
    from shared import models
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=cfg.augment.image_size,
                  token_mode=cfg.student.token_mode, heads=student_heads(cfg),
                  drop_path_rate=cfg.student.drop_path_rate, **cfg.student.options)
    return models.create_model(cfg.student.arch, **kwargs)


def kd_terms(cfg: RunConfig, heads: tuple[str, ...]) -> list[KDTerm]:
    """The KD terms of Eq. 1 in use, each mapped to its student head."""
    weights = {"conv": (cfg.loss.lambda1, cfg.loss.tau1), "inv": (cfg.loss.lambda2, cfg.loss.tau2)}
    terms = []
    for slot, teacher in cfg.kd.slots():
        head = "cls" if cfg.kd.shared_token else slot
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
    loss_fn: object
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
    views = cfg.data.views
    if cfg.data.cache:
        cache = LogitCache.open(cfg.data.cache)
        relation = cache_rows(manifest, cache.attrs.dataset_fingerprint, cfg.data.cache_data)   # subset: row map
        check_cache(cache.attrs, relation.cache_manifest, cfg.augment, cfg.data.view_seed, teacher_names, num_classes,
                    cfg.data.cache)
        warn_provenance(cache.attrs, cfg.data.cache, cfg.data.verify_views)
        records = {name: cache.attrs.teacher(name) for name in teacher_names}
        warn_kind_mismatch(cfg.kd, records)
        if cfg.loss.topk > cache.attrs.topk:
            raise ConfigError(f"loss.topk={cfg.loss.topk} but the cache {cfg.data.cache} holds only "
                              f"K={cache.attrs.topk} classes per view")
        if views and views > cache.attrs.views:
            raise DataError(f"data.views={views} but the cache has only E={cache.attrs.views} views")
        views = views or cache.attrs.views
    check_views(cfg.train.epochs, views, cfg.data.allow_repeat_views)
    in_chans = _channels(manifest, cfg)
    heads = student_heads(cfg)
    terms = kd_terms(cfg, heads)

    torch.manual_seed(cfg.train.seed)               # the student's initial weights depend on the seed only
    student = build_student(cfg, num_classes, in_chans)
    teachers = None
    if cfg.kd.mode == "online":
        teachers = load_online_teachers(cfg, records, num_classes, in_chans, runtime.device)
    cache_attrs = cache.attrs if cfg.data.cache else None
    criterion = CiTLoss(cfg.loss, terms, num_classes,
                        temperatures=cache_attrs.temperatures if cfg.kd.mode == "cached" else None,
                        cache_topk=cache_attrs.topk if cache_attrs else 0)
    mean, std = cfg.augment.mean, cfg.augment.std
    cached = cfg.kd.mode == "cached"

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        outputs = model_outputs(model(to_model_input(batch.views, mean, std)))
        if cached:
            targets = batch.targets(teacher_names)
        elif teachers is not None:
            targets = teachers(batch.views)
        else:
            targets = {}
        mix = None
        if batch.partner_labels is not None:   # mixed batch; cached approx targets are mixed in the loss
            mix = MixInfo(batch.partner_labels, batch.lam, batch.partner_index if cached else None)
        loss, parts = criterion(outputs, batch.labels, targets, mix)
        parts["acc"] = (outputs["cls"].detach().argmax(1) == batch.labels).float().mean()
        return loss, parts

    train_set = TrainViews(manifest, cfg.augment, cfg.data.view_seed, views, seed=cfg.train.seed,
                           shuffle=cfg.data.shuffle, cache_url=cfg.data.cache,
                           teachers=tuple(teacher_names) if cached else (), verify=cfg.data.verify_views,
                           rank=runtime.rank, world=runtime.world,
                           row_map=relation.rows if cfg.data.cache else None)
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
                "trained_heads": sorted({"cls"} | {t.head for t in terms}),
                **({"cache_rows": relation.record()} if cfg.data.cache else {})}
    return Prepared(cfg, runtime, manifest, train_set, student, loss_fn, teachers, eval_fn, views, run_meta)


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
    checkpoint.save_checkpoint(result.model, os.path.join(out_dir, "student.safetensors"), meta)
    write_json(os.path.join(out_dir, "run.json"), p.run_meta | {"final": last})
