"""Stage 1: the offline teacher-logit cache (build, resume, verify, info).

Python API (the CLI ``cit cache ...`` calls exactly these):

    from cache_builder import build_cache, cache_info, verify_cache
    summary = build_cache("data/train.json", ["conv=conv.pt", "inv=inv.pt"], "cache.zarr", views=4, topk=10)
    extend_cache("cache.zarr", 8, GrowSettings(data="data/train.json"))   # and add_teachers, merge_caches, ...
    info = cache_info("cache.zarr"); report = verify_cache("cache.zarr", data="data/train.json", recompute=32)
"""
from cache_builder.assemble import export_cache, merge_caches
from cache_builder.build import BuildSettings, BuildSummary, build_cache
from cache_builder.errors import BuildError
from cache_builder.grow import GrowSettings, add_teachers, extend_cache
from cache_builder.info import cache_info, format_info
from cache_builder.verify import VerifyReport, verify_cache

__all__ = ["BuildError", "BuildSettings", "BuildSummary", "build_cache", "extend_cache", "add_teachers",
           "GrowSettings", "merge_caches", "export_cache", "cache_info", "format_info", "VerifyReport", "verify_cache"]
