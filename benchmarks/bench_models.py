"""Model throughput at 28x28x1: teachers, students, and what the involution costs vs its conv twin.

Measures images/s for inference (eval, no grad) and a training step (forward + loss + backward +
AdamW step) at batch 128 for the default teachers and students, and compares `rednet_small` with its
conv twin (the same network with every involution replaced by a 3x3 conv) side by side in one run:
their measurements are interleaved (A B A B ...) and each model's best repeat is kept, so load from
other processes on a shared machine hits both alike. Also times the network with the plain unfold
involution (the official "naive" implementation) for reference.

    python benchmarks/bench_models.py                # full (a few minutes), writes benchmarks/results/models.json
    python benchmarks/bench_models.py --quick        # < 1 minute
    python benchmarks/bench_models.py --clock cpu --out benchmarks/results/models_cpu.json   # per-core CPU time
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shared.io import atomic_write_text  # noqa: E402
from shared.models import count_flops, count_params, create_model  # noqa: E402
import shared.models.involution as involution_module  # noqa: E402


@dataclass
class Case:
    label: str
    arch: str
    kwargs: dict = field(default_factory=dict)
    role: str = ""
    quick: bool = True          # part of --quick
    unfold: bool = False        # run with the unfold reference involution


CASES = [
    Case("rednet_small", "rednet_small", {}, "inv teacher (default)"),
    Case("rednet_small conv twin", "rednet_small", {"mixer": "conv"}, "involution -> 3x3 conv"),
    Case("rednet_small unfold op", "rednet_small", {}, "reference unfold involution", quick=False, unfold=True),
    Case("regnety_002 small-input", "regnety_002", {"small_input": True}, "conv teacher (default)"),
    Case("resnet18 small-input", "resnet18", {"small_input": True}, "conv teacher (larger)", quick=False),
    Case("cit_nano random", "cit_nano", {"token_mode": "random"}, "student"),
    Case("cit_nano align", "cit_nano", {"token_mode": "align"}, "student (default)"),
    Case("cit_tiny align", "cit_tiny", {"token_mode": "align"}, "student", quick=False),
]


@contextlib.contextmanager
def unfold_involution(enabled: bool):
    """Swap the memory-light op for the unfold reference inside `Involution.forward`."""
    if not enabled:
        yield
        return
    fast = involution_module.involution2d
    involution_module.involution2d = involution_module.involution_unfold_reference
    try:
        yield
    finally:
        involution_module.involution2d = fast


def loss_of(out, labels: torch.Tensor) -> torch.Tensor:
    heads = out if isinstance(out, dict) else {"cls": out}
    return sum(F.cross_entropy(v, labels) for v in heads.values())


class Runner:
    """Builds one case and times its inference and training steps."""

    def __init__(self, case: Case, batch: int, classes: int = 10, size: int = 28, chans: int = 1) -> None:
        self.case = case
        self.model = create_model(case.arch, num_classes=classes, in_chans=chans, img_size=size, **case.kwargs)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, chans, size, size, generator=gen)
        self.y = torch.randint(0, classes, (batch,), generator=gen)
        self.params = count_params(self.model)
        self.flops = count_flops(self.model, (chans, size, size)) if not case.unfold else None

    def forward(self) -> None:
        self.model.eval()
        with torch.no_grad(), unfold_involution(self.case.unfold):
            self.model(self.x)

    def train_step(self) -> None:
        self.model.train()
        with unfold_involution(self.case.unfold):
            loss = loss_of(self.model(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()


def timed(fn, min_time: float, max_iters: int, clock=time.perf_counter, warmup: bool = True) -> float:
    """Seconds per call: mean over >= min_time (at least one call), after an optional warm-up call."""
    if warmup:
        fn()
    n, start = 0, clock()
    while n < max_iters:
        fn()
        n += 1
        if clock() - start >= min_time:
            break
    return (clock() - start) / n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "models.json"))
    ap.add_argument("--quick", action="store_true", help="fewer models and repeats (< 1 minute)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats per model (best is kept)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time with torch's threads; cpu: CPU time of one thread (torch set to 1 "
                         "thread), i.e. images/s per core, insensitive to other processes on a shared machine")
    args = ap.parse_args(argv)
    if args.clock == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    repeats = args.repeats or (1 if args.quick else 3)
    min_time, max_iters = (0.0, 1) if args.quick else (1.0, 5)
    batch = args.batch if not args.quick else min(args.batch, 16)
    torch.manual_seed(0)
    cases = [c for c in CASES if c.quick or not args.quick]
    started = time.time()
    load_start = os.getloadavg()
    runners = [Runner(c, batch) for c in cases]
    fwd = {c.label: [] for c in cases}
    train = {c.label: [] for c in cases}
    for r in range(repeats):  # interleaved: every model once per round
        for runner in runners:
            warm = r == 0  # later rounds are warm already
            fwd[runner.case.label].append(timed(runner.forward, min_time, max_iters, clock, warm))
            train[runner.case.label].append(timed(runner.train_step, min_time, max_iters, clock, warm))
            print(f"  round {r + 1}/{repeats} {runner.case.label}: fwd {min(fwd[runner.case.label]) * 1e3:.0f} ms, "
                  f"train {min(train[runner.case.label]) * 1e3:.0f} ms", file=sys.stderr, flush=True)
    rows = []
    for runner in runners:
        c = runner.case
        tf, tt = min(fwd[c.label]), min(train[c.label])
        rows.append({"label": c.label, "arch": c.arch, "kwargs": c.kwargs, "role": c.role, "params": runner.params,
                     "gflops_per_image": None if runner.flops is None else runner.flops / 1e9,
                     "fwd_images_per_s": batch / tf, "train_images_per_s": batch / tt,
                     "fwd_ms_per_batch": tf * 1e3, "train_ms_per_batch": tt * 1e3,
                     "fwd_ms_all_repeats": [t * 1e3 for t in fwd[c.label]],
                     "train_ms_all_repeats": [t * 1e3 for t in train[c.label]]})
    by = {r["label"]: r for r in rows}
    inv, twin = by["rednet_small"], by["rednet_small conv twin"]
    comparison = {
        "what": "rednet_small (7x7 involutions) vs the same network with 3x3 convs; time ratio involution / conv "
                "(goal <= 2)",
        "fwd_time_ratio": inv["fwd_ms_per_batch"] / twin["fwd_ms_per_batch"],
        "fwd_bwd_step_time_ratio": inv["train_ms_per_batch"] / twin["train_ms_per_batch"],
    }
    if "rednet_small unfold op" in by:
        ref = by["rednet_small unfold op"]
        comparison["unfold_op_fwd_time_ratio"] = ref["fwd_ms_per_batch"] / twin["fwd_ms_per_batch"]
        comparison["unfold_op_fwd_bwd_step_time_ratio"] = ref["train_ms_per_batch"] / twin["train_ms_per_batch"]
    result = {
        "benchmark": "models", "quick": args.quick, "batch": batch, "input": [1, 28, 28], "num_classes": 10,
        "repeats": repeats, "statistic": "best of interleaved repeats", "clock": args.clock,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "seconds": time.time() - started,
        "models": rows,
        "involution_vs_conv_twin": comparison,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"{'model':28s} {'params':>9s} {'GFLOPs':>7s} {'fwd img/s':>10s} {'train img/s':>12s}")
    for r in rows:
        gf = "-" if r["gflops_per_image"] is None else f"{r['gflops_per_image']:.3f}"
        print(f"{r['label']:28s} {r['params'] / 1e6:8.2f}M {gf:>7s} {r['fwd_images_per_s']:10.0f} "
              f"{r['train_images_per_s']:12.0f}")
    print(f"involution / conv twin time: fwd {comparison['fwd_time_ratio']:.2f}x, "
          f"fwd+bwd+step {comparison['fwd_bwd_step_time_ratio']:.2f}x"
          + (f"; unfold op: fwd {comparison['unfold_op_fwd_time_ratio']:.2f}x, "
             f"fwd+bwd+step {comparison['unfold_op_fwd_bwd_step_time_ratio']:.2f}x"
             if "unfold_op_fwd_time_ratio" in comparison else ""))
    print(f"wrote {args.out} ({result['seconds']:.0f} s, threads {torch.get_num_threads()}, "
          f"load {load_start[0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f})")
    return result


if __name__ == "__main__":
    main()
