"""Model registry: every teacher and student is built by name through `create_model`.

Names: ``rednet26/38/50/101`` (ImageNet RedNets), ``rednet_small`` (28-32 px RedNet), ``cit_nano``,
``cit_tiny``, ``cit_small`` (token students), ``resnet10_student``, ``mixer_ti_student``, ``vit_ti_student`` (the
paper's other students, one linear head per distillation term), any timm model as a student as
``student:<timm name>``, and any timm model as ``timm:<name>`` or its bare name (``resnet18``, ``regnety_002``, ...;
add ``small_input=True`` for 28-32 px images).

Every builder takes ``num_classes``, ``in_chans`` and ``img_size`` (CNNs ignore the last). The model
remembers how it was built (``model.model_spec = {"arch": name, "kwargs": {...}}``) so a checkpoint
can rebuild it without the caller repeating the options.
"""
from __future__ import annotations

from typing import Callable, Iterable

import timm
import torch.nn as nn

from .cit import CiT, cit_nano, cit_small, cit_tiny
from .conv import adapt_small_input, create_conv_teacher
from .flops import count_flops, count_params
from .involution import Involution, involution2d, involution_unfold_reference
from .normalize import Normalized, unwrap
from .rednet import RedNet, rednet26, rednet38, rednet50, rednet101, rednet_small
from .students import STUDENT_BUILDERS, TimmStudent, timm_student

__all__ = [
    "create_model", "list_models", "is_model", "model_kind", "describe_models", "register_model", "is_token_student",
    "CiT", "TimmStudent", "RedNet", "Involution", "Normalized", "unwrap", "involution2d", "involution_unfold_reference",
    "create_conv_teacher", "adapt_small_input", "count_params", "count_flops",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_KINDS: dict[str, str] = {}


def register_model(name: str, builder: Callable[..., nn.Module], kind: str) -> None:
    """Add a builder (``kind``: ``conv``, ``inv``, ``student`` or ``other``)."""
    _REGISTRY[name] = builder
    _KINDS[name] = kind


for _name, _fn in (("rednet26", rednet26), ("rednet38", rednet38), ("rednet50", rednet50),
                   ("rednet101", rednet101), ("rednet_small", rednet_small)):
    register_model(_name, _fn, "inv")
for _name, _fn in (("cit_nano", cit_nano), ("cit_tiny", cit_tiny), ("cit_small", cit_small)):
    register_model(_name, _fn, "student")
for _name, _fn in STUDENT_BUILDERS.items():
    register_model(_name, _fn, "student")
STUDENT_PREFIX = "student:"


def is_token_student(name: str) -> bool:
    """CiT builders: students whose distillation heads read their own tokens (they take ``token_mode``)."""
    return name in ("cit_nano", "cit_tiny", "cit_small")


def list_models(include_timm: bool = False) -> list[str]:
    """Registered names (plus every timm name when ``include_timm``)."""
    names = sorted(_REGISTRY)
    return names + timm.list_models() if include_timm else names


def _timm_name(name: str) -> str | None:
    if name.startswith(STUDENT_PREFIX):
        return None
    if name.startswith("timm:"):
        return name[5:]
    return None if name in _REGISTRY else name


def is_model(name: str) -> bool:
    if name.startswith(STUDENT_PREFIX):
        return timm.is_model(name[len(STUDENT_PREFIX):])
    base = _timm_name(name)
    return base is None or timm.is_model(base)


def model_kind(name: str) -> str:
    """``inv`` for RedNets, ``student`` for CiT, ``conv`` for timm models."""
    if name in _KINDS:
        return _KINDS[name]
    if name.startswith(STUDENT_PREFIX) and is_model(name):
        return "student"
    if not is_model(name):
        raise ValueError(_unknown(name))
    return "conv"


def _unknown(name: str) -> str:
    return (f"unknown model {name!r}: not one of {', '.join(sorted(_REGISTRY))} and not a timm model name "
            f"(any name in timm.list_models() works, optionally as 'timm:<name>')")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build model ``name`` with ``kwargs`` (num_classes, in_chans, img_size, model options)."""
    base = _timm_name(name)
    if name.startswith(STUDENT_PREFIX):
        if not is_model(name):
            raise ValueError(_unknown(name[len(STUDENT_PREFIX):]))
        builder = lambda **kw: timm_student(name[len(STUDENT_PREFIX):], **kw)  # noqa: E731
    elif base is None:
        builder: Callable[..., nn.Module] = _REGISTRY[name]
    elif timm.is_model(base):
        builder = lambda **kw: create_conv_teacher(base, **kw)  # noqa: E731
    else:
        raise ValueError(_unknown(name))
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise TypeError(f"cannot build {name!r} with options {sorted(kwargs)}: {exc}") from exc
    model.model_spec = {"arch": name, "kwargs": dict(kwargs)}
    return model


def describe_models(
    names: Iterable[str],
    img_size: int = 224,
    in_chans: int = 3,
    num_classes: int = 1000,
    small_input: bool | None = None,
) -> list[dict]:
    """Parameters and forward FLOPs per image of each model at the given input.

    ``small_input`` applies to timm CNNs (None: on for images up to 64 px, where it is what you want).
    """
    rows = []
    for name in names:
        kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size}
        kind = model_kind(name)
        if kind == "conv":
            kwargs["small_input"] = img_size <= 64 if small_input is None else small_input
        model = create_model(name, **kwargs)
        rows.append({
            "name": name, "kind": kind, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes,
            "small_input": kwargs.get("small_input"), "params": count_params(model),
            "flops": count_flops(model, (in_chans, img_size, img_size)),
        })
    return rows
