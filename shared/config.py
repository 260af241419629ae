"""Config files (TOML) with command-line overrides, turned into dataclasses that reject unknown keys.

A config is a TOML file of sections (``[augment]``, ``[train]``, ...).  ``key.sub=value`` overrides on the
command line are parsed as TOML values (``train.lr=5e-4``, ``augment.rrc_scale=[0.35, 1.0]``, ``kd.mode="none"``
or ``kd.mode=none``).  Each stage maps its section onto a dataclass with ``section(cfg, "name", Cls)``.
"""
from __future__ import annotations

import copy
import dataclasses
import tomllib
import typing
from pathlib import Path

from shared.errors import CitUserError


class ConfigError(CitUserError):
    """A config file or override is malformed or names an unknown option; the message names it."""


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> dict:
    cfg: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                cfg = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for item in overrides:
        set_dotted(cfg, item)
    return cfg


def set_dotted(cfg: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: kd.mode=none
    *parents, leaf = dotted.strip().split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = value


T = typing.TypeVar("T")


def section(cfg: dict, name: str, cls: type[T]) -> T:
    """Build dataclass ``cls`` from ``cfg[name]``; unknown keys are an error naming the section and key."""
    data = copy.deepcopy(cfg.get(name, {}))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"known in [{name}]: {', '.join(sorted(known))}")
    data = check_fields(data, name, cls)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{name}]: {exc}") from None


def check_fields(data: dict, name: str, cls: type) -> dict:
    """``data`` (section ``name``) with every value of a known field checked against its type (see check_type)."""
    hints = typing.get_type_hints(cls)
    return {key: check_type(f"{name}.{key}", value, hints[key]) if key in hints else value
            for key, value in data.items()}


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_type(option: str, value, hint):
    """``value`` converted to the field type ``hint`` (int -> float, list -> tuple), or a ConfigError naming the
    option and the type it wants: ``--set train.epochs=two`` is refused here, not deep inside the training."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for alternative in args:
            if alternative is type(None) and value is None:
                return None
            try:
                return check_type(option, value, alternative)
            except ConfigError:
                continue
        raise _type_error(option, value, " or ".join(_type_name(a) for a in args if a is not type(None)))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _type_error(option, value, f"a list ({_type_name(hint)})")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise _type_error(option, value, f"a list of {len(args)} values ({_type_name(hint)})")
        kinds = args[:1] * len(value) if origin is list or (args and args[-1] is Ellipsis) else args
        items = [check_type(f"{option}[{i}]", v, k) for i, (v, k) in enumerate(zip(value, kinds))] if kinds \
            else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _type_error(option, value, "a table ({...})")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    if hint in _TYPE_WORDS:
        raise _type_error(option, value, f"{_TYPE_WORDS[hint]} ({hint.__name__})")
    return value    # a type this check does not know: the dataclass itself validates it


def _type_error(option: str, value, wanted: str) -> ConfigError:
    shown = value if not isinstance(value, str) else repr(value)
    return ConfigError(f"option {option} must be {wanted}, got {shown} (in the config file or --set {option}=...)")
