"""The teachers of a build: loaded from their checkpoints, run on uint8 views on the device, their top-k
targets packed into one tensor per batch (one device->host copy) and unpacked on the host."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from cache_builder.errors import BuildError
from shared.cache_schema import RESERVED_NAMES, TeacherRecord, TopK
from shared.features import FEATURE_DTYPE, FeatureError, encode_features, feature_dim, logits_and_pooled
from shared.io import is_local, local_path
from shared.targets import encode_logits


@dataclass
class Teacher:
    name: str
    checkpoint: str
    model: torch.nn.Module
    record: TeacherRecord
    in_chans: int | None


def _meta(meta, *names, default=None):
    for name in names:
        if isinstance(meta, dict) and name in meta:
            return meta[name]
        if not isinstance(meta, dict) and hasattr(meta, name):
            return getattr(meta, name)
    return default


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def parse_teacher_args(items) -> list[tuple[str, str]]:
    """``["conv=ckpt.pt", ...]`` or a dict -> [(name, path)], names checked (valid group names, unique)."""
    pairs = list(items.items()) if isinstance(items, dict) else []
    if not isinstance(items, dict):
        for item in items:
            if isinstance(item, (tuple, list)):
                pairs.append((str(item[0]), str(item[1])))
                continue
            if "=" not in item:
                raise BuildError(f"--teacher {item!r} must look like NAME=CHECKPOINT")
            name, path = item.split("=", 1)
            pairs.append((name.strip(), path.strip()))
    if not pairs:
        raise BuildError("at least one --teacher NAME=CHECKPOINT is needed")
    seen = set()
    for name, _ in pairs:
        if not _NAME.match(name) or name in RESERVED_NAMES:
            raise BuildError(f"teacher name {name!r} is not allowed: use letters, digits, '_' and '-', and not "
                             f"{' or '.join(RESERVED_NAMES)}")
        if name in seen:
            raise BuildError(f"teacher name {name!r} is given twice")
        seen.add(name)
    return pairs


def load_recorded_teachers(attrs, pairs: list[tuple[str, str]], device: torch.device) -> list[Teacher]:
    """The teachers of a finished cache (``attrs``: its ``CacheAttrs``) at ``pairs`` (name, checkpoint), each checked
    to be the checkpoint the cache recorded (sha256), for re-running them on its views."""
    from shared.view_spec import ViewSpec
    loaded = load_teachers(pairs, attrs.num_classes, device, view_size=ViewSpec.from_dict(attrs.augment).image_size)
    for t in loaded:
        expected = attrs.teacher(t.name).checkpoint_sha256
        if expected and t.record.checkpoint_sha256 != expected:
            raise BuildError(f"teacher {t.name}: checkpoint {t.checkpoint} is not the one the cache was built with "
                             f"(sha256 {t.record.checkpoint_sha256[:12]}… != {expected[:12]}…)")
    return loaded


def load_teachers(pairs: list[tuple[str, str]], num_classes: int, device: torch.device,
                  view_size: int | None = None) -> list[Teacher]:
    """``view_size``: the side of the views; a teacher built for another input size gets them resized."""
    from shared.checkpoint import load_checkpoint
    teachers = []
    for name, path in pairs:
        try:
            model, meta = load_checkpoint(path, expect_classes=num_classes)
        except FileNotFoundError:
            raise BuildError(f"teacher {name}: checkpoint {path} does not exist") from None
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise BuildError(f"teacher {name}: cannot use checkpoint {path}: {exc}") from None
        classes = int(_meta(meta, "num_classes"))
        if classes != num_classes:   # load_checkpoint checks too; never trust a single guard
            raise BuildError(f"teacher {name} ({path}) predicts {classes} classes but the data has {num_classes}")
        mean, std = _meta(meta, "mean", "input_mean"), _meta(meta, "std", "input_std")
        if mean is None or std is None:
            raise BuildError(f"teacher {name}: checkpoint {path} does not record its input normalisation")
        kind = str(_meta(meta, "kind", default="other") or "other")
        record = TeacherRecord(name=name, kind=kind, arch=str(_meta(meta, "arch", default="?")),
                               checkpoint_sha256=str(_meta(meta, "sha256", "checkpoint_sha256", default="")),
                               num_classes=classes, mean=[float(x) for x in mean], std=[float(x) for x in std],
                               extra={"checkpoint": os.path.abspath(local_path(path)) if is_local(path) else str(path)})
        record.input_size, record.interpolation = meta.resize_for(view_size)
        acc = _meta(meta, "test_accuracy", "accuracy")
        if acc is not None:
            record.extra["checkpoint_test_accuracy"] = float(acc)
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        in_chans = _meta(meta, "in_chans")
        teachers.append(Teacher(name, str(path), model, record, int(in_chans) if in_chans is not None else None))
    return teachers


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise BuildError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise BuildError("bf16 autocast is only used on CUDA; use --precision fp32 (or auto) on CPU")
    return precision


class TeacherRunner:
    """Runs every teacher on a uint8 batch on the device; returns device tensors, never syncs with the host."""

    def __init__(self, teachers: list[Teacher], device: torch.device, precision: str, topk: int,
                 temperatures: tuple[float, ...] = (1.0,), features: str = ""):
        self.teachers, self.device, self.precision, self.topk = teachers, device, precision, topk
        self.temperatures = tuple(temperatures)
        self.features = features        # "pooled": every teacher's pooled features too ("": none)
        if features:
            for teacher in teachers:        # the width is part of the cache's identity (and of the layout)
                try:
                    teacher.record.feature_dim = feature_dim(teacher.model)
                except FeatureError as exc:
                    raise BuildError(f"teacher {teacher.name} ({teacher.checkpoint}): --features {features} needs "
                                     f"its pooled features, but {exc}") from None
                teacher.record.feature_dtype = FEATURE_DTYPE
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False      # same algorithm for the same shapes: reproducible bits
            torch.backends.cudnn.deterministic = True

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def normalise(self, teacher: Teacher, views: torch.Tensor) -> torch.Tensor:
        """The teacher's own input size (resized on the device, when it differs) and normalisation."""
        from shared.models.normalize import teacher_input   # here: importing timm slows every `cit` command
        record = teacher.record
        return teacher_input(views, record.mean, record.std, record.input_size, record.interpolation)

    def logits(self, teacher: Teacher, views: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on the device -> float32 logits (B, classes)."""
        with self._autocast():
            out = teacher.model(self.normalise(teacher, views))
        if isinstance(out, dict):       # models with several heads: the class head
            out = out["cls"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def logits_and_pooled(self, teacher: Teacher, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views -> float32 (logits (B, classes), pooled features (B, D)) from one pass of the teacher."""
        with self._autocast():
            logits, pooled = logits_and_pooled(teacher.model, self.normalise(teacher, views))
        return logits.float(), pooled.float()

    def _pack(self, logits: torch.Tensor) -> torch.Tensor:
        logp, indices, tail = encode_logits(logits, self.topk, self.temperatures)
        finite = torch.isfinite(logits).all(dim=1, keepdim=True).float()
        return torch.cat([logp, indices.float(), tail, finite], dim=1)

    def packed_topk(self, views: torch.Tensor) -> torch.Tensor:
        """float32 (B, T, 2K+S+1): per teacher [top-k log-probs, their indices, tail log-mass at each cached τ,
        a finiteness flag of the full logits]: all from the full fp32 logits on the device (``shared.targets``)."""
        return torch.stack([self._pack(self.logits(teacher, views)) for teacher in self.teachers], dim=1)

    def outputs(self, views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What a batch stores: ``(packed_topk,)``, or with features ``(packed_topk, uint8 codes (B, ΣD), float32
        (lo, step) (B, T, 2))`` of every teacher's pooled features (``shared.features``), encoded on the device."""
        if not self.features:
            return (self.packed_topk(views),)
        parts, codes, scales = [], [], []
        for teacher in self.teachers:
            logits, pooled = self.logits_and_pooled(teacher, views)
            parts.append(self._pack(logits))
            code, scale = encode_features(pooled)
            codes.append(code)
            scales.append(scale)
        return torch.stack(parts, dim=1), torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def unpack_topk(packed: np.ndarray, teacher_index: int, topk: int, num_classes: int) -> tuple[TopK, np.ndarray]:
    """The stored record of one teacher and the per-row finiteness of its logits."""
    block = packed[:, teacher_index]
    logp, tail = block[:, :topk], block[:, 2 * topk:-1]
    ok = (block[:, -1] == 1) & np.isfinite(logp).all(axis=1) & ~np.isnan(tail).any(axis=1)
    return TopK.from_float(logp, block[:, topk:2 * topk], tail, num_classes), ok


def unpack_features(codes: np.ndarray, scales: np.ndarray, teacher_index: int,
                    dims: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One teacher's feature codes (B, D) and (lo, step) (B, 2), and the per-row finiteness of its features."""
    start = sum(dims[:teacher_index])
    scale = np.ascontiguousarray(scales[:, teacher_index])
    return (np.ascontiguousarray(codes[:, start:start + dims[teacher_index]]), scale,
            np.isfinite(scale).all(axis=1))


def check_finite(out: tuple[TopK, np.ndarray], teacher: str, keys: list[str], where: str,
                 what: str = "logits") -> None:
    bad = ~out[1]
    if bad.any():
        first = int(np.argmax(bad))
        raise BuildError(f"teacher {teacher} produced non-finite {what} (NaN/Inf) on sample {keys[first]!r} "
                         f"({where}; {int(bad.sum())} of {len(keys)} samples in that batch); nothing was stored "
                         "for it")
