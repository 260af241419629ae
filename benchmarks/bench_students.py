"""Cost per training step from the cache vs online, for each student family (CiT, ResNet-10, Mixer-Ti, ViT-Ti).

The real trainer's pieces (``trainer.train.prepare``: shard stream, replay, cache join or live teachers, Eq. 1,
AdamW) for both modes over the same shards and views, steps interleaved and paired as in ``bench_train.py``'s
``throughput`` (one process, ``num_workers = 0``: the join is not hidden in a worker, the worst case for the
cache).  Teachers: bench_train's defaults (``regnety_002`` small-input stem and ``rednet_small``, random weights:
cost does not depend on them).  Students at the paper's sizes (12 blocks, width 192 for Mixer-Ti and ViT-Ti;
``resnet10t``), 28 px, 1 channel, three heads.

    python benchmarks/bench_students.py [--quick] [--out benchmarks/results/students.json]

``--quick``: 128 samples, batch 16, one epoch per mode (6 timed steps per mode and family).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import SPEC, machine_info, throughput, throughput_world   # noqa: E402
from shared.io import atomic_write_text                              # noqa: E402

FAMILIES = ("cit_nano", "cit_tiny", "resnet10_student", "mixer_ti_student", "vit_ti_student")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/students.json"))
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated student archs")
    parser.add_argument("--samples", type=int, help="training samples = steps per round x batch [512; quick 128]")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, rounds, batch = (128, 1, 16) if args.quick else (512, 2, 32)
    n = args.samples or n
    result = {"machine": machine_info(),
              "settings": {"quick": args.quick, "samples": n, "rounds": rounds, "batch_size": batch,
                           "image_size": SPEC.image_size, "threads": torch.get_num_threads(),
                           "command": " ".join(["python", *sys.argv])},
              "families": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        manifest, checkpoints, cache = throughput_world(folder, n, rounds)
        for arch in args.families.split(","):
            r = throughput(manifest, cache, checkpoints, arch, rounds, batch, ("cached", "online"))
            result["families"][arch] = r
            print(f"{arch}: {r['params']:,} params; step ms cached {r['cached']['step_ms_median']:.0f}, online "
                  f"{r['online']['step_ms_median']:.0f}; online/cached step time (paired median) "
                  f"{r['cached_over_online_paired_median']:.2f}", flush=True)
            write(args.out, result, started)        # after every family: a cut-short run keeps what it measured
    write(args.out, result, started)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


def write(path: str, result: dict, started: float) -> None:
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
