"""Where a cache's views were rendered: library versions, CPU capability or GPU, view-code version.

Recorded by the builder, shown by ``cit cache info`` and compared by ``cit train``: another environment only
earns a warning — the per-view pixel digests decide whether its views are the ones the teachers saw.
"""
from __future__ import annotations

import importlib.metadata
import platform

LIBRARIES = ("torch", "torchvision", "timm", "pillow", "numpy", "zarr", "cit")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect(device: str = "cpu") -> dict:
    """This process's environment, JSON-able.  ``device``: the teachers' device type (cuda: the GPU's name)."""
    import torch
    from shared.views import VIEW_CODE
    out = {"libraries": {name: _version(name) for name in LIBRARIES},
           "python": platform.python_version(), "machine": platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "view_code": dict(VIEW_CODE)}
    if device == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(recorded: dict, current: dict) -> list[str]:
    """``name: recorded -> current`` for every entry that differs (GPU only when both have one)."""
    a, b = _flatten(recorded), _flatten(current)
    if "gpu" not in a or "gpu" not in b:
        a.pop("gpu", None)
        b.pop("gpu", None)
    return [f"{k.removeprefix('libraries.')} {a.get(k, '?')} -> {b.get(k, '?')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def summary(recorded: dict) -> str:
    """One line for ``cit cache info``."""
    if not recorded:
        return "not recorded"
    libs = " ".join(f"{k} {v}" for k, v in recorded.get("libraries", {}).items())
    where = f"cpu {recorded.get('cpu_capability', '?')}" + (f", gpu {recorded['gpu']}" if recorded.get("gpu") else "")
    return f"{libs}; python {recorded.get('python', '?')} {recorded.get('machine', '?')}; {where}"
