"""Stage 1: the offline teacher-logit cache (build, resume, verify, info).

Python API (the CLI ``cit cache ...`` calls exactly these):

    from cache_builder import build_cache, cache_info, verify_cache
    summary = build_cache("data/train.json", ["conv=conv.pt", "inv=inv.pt"], "cache.zarr", views=4, topk=10)
    extend_cache("cache.zarr", 8, GrowSettings(data="data/train.json"))   # and add_teachers, merge_caches, ...
    info = cache_info("cache.zarr"); report = verify_cache("cache.zarr", data="data/train.json", recompute=32)
"""
import importlib

# name -> module: imported on first use, so ``import cache_builder.cli`` (``cit --help``) does not start torch
_EXPORTS = {"export_cache": "assemble", "merge_caches": "assemble", "BuildSettings": "build", "BuildSummary": "build",
            "build_cache": "build", "BuildError": "errors", "GrowSettings": "grow", "add_teachers": "grow",
            "extend_cache": "grow", "cache_info": "info", "format_info": "info", "VerifyReport": "verify",
            "verify_cache": "verify"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cache_builder.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cache_builder' has no attribute {name!r}")
