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
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            data[key] = tuple(value)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{name}]: {exc}") from None
