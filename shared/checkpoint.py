"""Model checkpoints without pickle: safetensors weights + a JSON sidecar describing the model.

Layout: the weights live exactly at the path the caller names (``teacher.safetensors``, or any
other name, e.g. ``ckpt.pt``); the sidecar is the same path with its suffix replaced by ``.json``.
The sidecar (`ModelMeta`) says how to rebuild the model through ``shared.models.create_model``
(architecture + builder kwargs), what it is (kind, classes, input channels, image size), the input
normalisation it was trained with, its measured test accuracy, and the sha256 of the weights file
(so ``sha256sum teacher.safetensors`` is the checkpoint's identity, which the cache records).

Writes are atomic: weights to a temp file + ``os.replace``, then the sidecar the same way. The
sidecar goes last, so a crash leaves either the previous complete checkpoint or weights without a
(matching) sidecar, which `load_checkpoint` rejects; never a half checkpoint that looks complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from shared.errors import CitUserError
from shared.io import atomic_write_local

__all__ = ["ModelMeta", "TeacherMeta", "CheckpointError", "CheckpointNotFoundError", "save_checkpoint",
           "load_checkpoint", "read_meta", "write_meta", "sidecar_path", "file_sha256", "KINDS"]

FORMAT = "cit-checkpoint"
VERSION = 1
KINDS = ("conv", "inv", "student", "other")


class CheckpointError(CitUserError):
    """A checkpoint is missing, corrupt, or not the model the caller expects; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The weights file or its sidecar does not exist."""


@dataclass
class ModelMeta:
    """The JSON sidecar of a checkpoint. Unknown keys given to `from_dict` are kept in ``extra``."""

    arch: str
    num_classes: int
    in_chans: int
    kind: str = "other"
    img_size: int | None = None     # the input side the model expects; other view sizes are resized to it
    interpolation: str | None = None    # how views are resized to img_size (None: bilinear)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # create_model options besides the above
    mean: list[float] | None = None
    std: list[float] | None = None
    test_accuracy: float | None = None
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. dataset fingerprint, training config
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {self.kind!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None:
            self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.in_chans):
                raise ValueError(f"mean/std have {len(self.mean)}/{len(self.std)} values for {self.in_chans} channels")

    # dict-like read access, so callers can treat the meta like the JSON it is
    def get(self, key: str, default: Any = None) -> Any:
        if key in self.__dataclass_fields__:
            value = getattr(self, key)
            return default if value is None else value
        return self.extra.get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        return self.extra[key]

    def resize_for(self, view_size: int | None) -> tuple[int | None, str | None]:
        """(input side, interpolation) to resize ``view_size`` views to for this model, or (None, None) when the
        views already have its size (or it records none). Interpolation: its own, else its training view's."""
        if self.img_size is None or view_size is None or int(self.img_size) == int(view_size):
            return None, None
        trained = (self.extra.get("augment") or {}).get("interpolation")
        return int(self.img_size), self.interpolation or trained or "bilinear"

    def build_kwargs(self) -> dict[str, Any]:
        """Everything `create_model(self.arch, **kwargs)` needs."""
        kwargs = dict(self.model_kwargs)
        kwargs.update(num_classes=self.num_classes, in_chans=self.in_chans)
        if self.img_size is not None:
            kwargs.setdefault("img_size", self.img_size)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(known.pop("extra", None) or {})
        extra.update({k: v for k, v in data.items() if k not in names})
        missing = [k for k in ("arch", "num_classes", "in_chans") if k not in known]
        if missing:
            raise ValueError(f"checkpoint metadata lacks {missing}")
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        return cls.from_dict(json.loads(text))


TeacherMeta = ModelMeta


def sidecar_path(path: str | os.PathLike) -> str:
    """``dir/name.ext`` -> ``dir/name.json`` (the weights path itself when it has no suffix + .json)."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    if ext == ".json":
        raise CheckpointError(f"{path}: give the weights file, not the sidecar")
    return root + ".json"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _meta_for(model: nn.Module, meta: ModelMeta | Mapping[str, Any] | None) -> ModelMeta:
    """Complete ``meta`` from what the model knows about itself (``model_spec``, its classifier)."""
    spec = getattr(model, "model_spec", None) or {}
    data = meta.to_dict() if isinstance(meta, ModelMeta) else dict(meta or {})
    spec_kwargs = dict(spec.get("kwargs", {}))
    data.setdefault("arch", spec.get("arch"))
    if data["arch"] is None:
        raise CheckpointError("save_checkpoint: no 'arch' in meta and the model was not built by create_model")
    for key in ("num_classes", "in_chans", "img_size"):
        if data.get(key) is None:
            value = spec_kwargs.get(key, getattr(model, key, None))
            if value is not None:
                data[key] = value
    if not data.get("model_kwargs") and spec.get("arch") == data["arch"]:
        data["model_kwargs"] = {k: v for k, v in spec_kwargs.items() if k not in ("num_classes", "in_chans")}
    if "kind" not in data or data["kind"] is None:
        from shared.models import model_kind
        data["kind"] = model_kind(data["arch"])
    data["model_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data.get("model_kwargs", {}).items()}
    data.pop("sha256", None)
    try:
        out = ModelMeta.from_dict(data)
        out.to_json()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"save_checkpoint: bad metadata: {exc}") from exc
    return out


def save_checkpoint(model: nn.Module, path: str | os.PathLike,
                    meta: ModelMeta | Mapping[str, Any] | None = None) -> ModelMeta:
    """Write ``model``'s weights to ``path`` (safetensors) and its sidecar; returns the final meta.

    ``meta`` may be a `ModelMeta` or a dict with its keys (unknown keys go to ``extra``); missing
    arch / num_classes / in_chans / model_kwargs are taken from how `create_model` built the model.
    A `Normalized` wrapper is unwrapped (its mean/std fill the meta when absent).
    """
    from shared.models.normalize import Normalized, unwrap

    path = os.fspath(path)
    if isinstance(model, Normalized) and (meta is None or "mean" not in (meta.to_dict() if isinstance(meta, ModelMeta) else meta)):
        meta = {**(meta.to_dict() if isinstance(meta, ModelMeta) else dict(meta or {})),
                "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    model = unwrap(model)
    info = _meta_for(model, meta)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    side = sidecar_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_local(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, "arch": info.arch}))
    info.sha256 = file_sha256(path)
    atomic_write_local(side, lambda tmp: _write_text(tmp, info.to_json() + "\n"))
    return info


def write_meta(path: str | os.PathLike, meta: ModelMeta) -> None:
    """Replace the sidecar of weights file ``path`` (e.g. to add a measured accuracy); the weights must be the
    ones the sidecar's sha256 names."""
    path = os.fspath(path)
    if meta.sha256 != file_sha256(path):
        raise CheckpointError(f"{path}: the weights are not the ones this metadata describes (sha256 differs)")
    atomic_write_local(sidecar_path(path), lambda tmp: _write_text(tmp, meta.to_json() + "\n"))


def _check_safetensors(path: str) -> None:
    """Structural check of a safetensors file, so truncation gets a precise message."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file (expected {8 + n + end} bytes, "
                              f"found {size})")


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The sidecar of weights file ``path`` (no weights are read)."""
    path = os.fspath(path)
    side = sidecar_path(path)
    if not os.path.exists(side):
        raise CheckpointNotFoundError(f"{path}: sidecar {side} is missing (incomplete or foreign checkpoint)")
    try:
        with open(side) as f:
            return ModelMeta.from_json(f.read())
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{side}: unreadable checkpoint metadata: {exc}") from None


def load_checkpoint(
    path: str | os.PathLike,
    expect_classes: int | None = None,
    expect_in_chans: int | None = None,
    map_location: str | torch.device = "cpu",
    normalized: bool = False,
) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model of checkpoint ``path`` via the registry and load its weights.

    Checks, each failing with a `CheckpointError` that names the file: both files exist, the
    safetensors file is complete, its sha256 matches the sidecar, the classes / input channels match
    what the caller expects, and the weights fit the rebuilt architecture exactly.
    ``normalized=True`` wraps the model in `Normalized` with the recorded mean/std.
    """
    from shared.models import create_model
    from shared.models.normalize import Normalized

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    meta = read_meta(path)
    if expect_classes is not None and meta.num_classes != expect_classes:
        raise CheckpointError(f"{path}: checkpoint predicts {meta.num_classes} classes but {expect_classes} are "
                              f"expected")
    if expect_in_chans is not None and meta.in_chans != expect_in_chans:
        raise CheckpointError(f"{path}: checkpoint takes {meta.in_chans} input channels but {expect_in_chans} are "
                              f"expected")
    _check_safetensors(path)
    digest = file_sha256(path)
    if meta.sha256 and digest != meta.sha256:
        raise CheckpointError(f"{path}: sha256 {digest[:12]}… does not match its sidecar's {meta.sha256[:12]}… "
                              f"(file modified or replaced after saving)")
    try:
        tensors = load_file(path, device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors data: {exc}") from None
    try:
        model = create_model(meta.arch, **meta.build_kwargs())
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild {meta.arch!r}: {exc}") from None
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit {meta.arch!r} built with {meta.build_kwargs()}: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit {meta.arch!r} built with {meta.build_kwargs()}: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.to(map_location)
    if normalized:
        if meta.mean is None:
            raise CheckpointError(f"{path}: no input normalisation recorded; cannot wrap in Normalized")
        mean = meta.mean * meta.in_chans if len(meta.mean) == 1 else meta.mean
        std = meta.std * meta.in_chans if len(meta.std) == 1 else meta.std
        model = Normalized(model, mean, std).to(map_location)
    return model, meta
