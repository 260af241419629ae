"""Growing a cache costs the new work only: time of ``extend`` (E -> 2E views) and ``add-teacher`` (1 -> 2 teachers)
vs a fresh build of the same final cache, side by side in one run (and checked to be bit-identical to it).

    .venv/bin/python benchmarks/bench_grow.py --out benchmarks/results/grow.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cache import SPEC, TINY, fmnist_images, save_teacher, write_dataset   # noqa: E402
from common import command, machine, write_result                              # noqa: E402
from cache_builder import build_cache                                           # noqa: E402
from cache_builder.grow import GrowSettings, add_teachers, extend_cache         # noqa: E402


def _arrays_equal(a: str, b: str) -> bool:
    import numpy as np
    import zarr

    def walk(group, prefix=""):
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                yield from walk(node, prefix + name + "/")
            else:
                yield prefix + name, np.asarray(node[...])
    x, y = dict(walk(zarr.open_group(a, mode="r"))), dict(walk(zarr.open_group(b, mode="r")))
    return sorted(x) == sorted(y) and all(np.array_equal(x[k].view(f"u{x[k].itemsize}"),
                                                         y[k].view(f"u{y[k].itemsize}")) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grow.json"))
    ap.add_argument("--quick", action="store_true", help="96 samples, E 1 -> 2 (seconds)")
    args = ap.parse_args()
    load = os.getloadavg()
    n, e = (96, 1) if args.quick else (1024, 2)
    tmp = tempfile.mkdtemp(prefix="bench-grow-")
    try:
        images, labels, source = fmnist_images(n)
        manifest = write_dataset(os.path.join(tmp, "fm"), images, labels, 10, 256)
        arch, kw = TINY
        paths = {name: save_teacher(os.path.join(tmp, f"{name}.safetensors"), arch, name, 10, i, **kw)
                 for i, name in enumerate(("conv", "inv"))}
        options = dict(topk=5, spec=SPEC, seed=0, batch_size=64, workers=1, threads=1, progress=False)
        settings = GrowSettings(data=manifest.path, workers=1, progress=False)

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        both = [f"{k}={v}" for k, v in paths.items()]
        fresh = {"extend": timed(lambda: build_cache(manifest.path, both, f"{tmp}/fresh.zarr", views=2 * e,
                                                     **options))}
        fresh["add_teacher"] = fresh["extend"]        # the same final cache: 2 teachers, 2E views
        base = {"extend": build_cache(manifest.path, both, f"{tmp}/ext.zarr", views=e, **options),
                "add_teacher": build_cache(manifest.path, both[:1], f"{tmp}/add.zarr", views=2 * e, **options)}
        grow = {"extend": timed(lambda: extend_cache(f"{tmp}/ext.zarr", 2 * e, settings)),
                "add_teacher": timed(lambda: add_teachers(f"{tmp}/add.zarr", both[1:], settings))}
        result = {"settings": {"command": command(), "quick": args.quick, "samples": n, "views": [e, 2 * e],
                               "teachers": ["conv", "inv"], "teacher_arch": {"arch": arch, **kw}, "data": source,
                               "batch_size": 64, "threads": 1, "workers": 1},
                  "machine": machine(load)}
        for op, (target, name) in {"extend": ("ext", "extend E->2E, 2 teachers"),
                                   "add_teacher": ("add", "add 1 teacher to 1, 2E views")}.items():
            result[op] = {"what": name, "seconds": grow[op], "fresh_build_seconds": fresh[op],
                          "ratio_vs_fresh": grow[op] / fresh[op], "base_build_seconds": base[op].seconds,
                          "identical_to_fresh": _arrays_equal(f"{tmp}/{target}.zarr", f"{tmp}/fresh.zarr")}
            print(f"{name}: {grow[op]:.2f}s vs fresh {fresh[op]:.2f}s = {grow[op] / fresh[op]:.2f}x; identical: "
                  f"{result[op]['identical_to_fresh']}")
        write_result(args.out, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
