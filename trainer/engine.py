"""The training loop both the student and the teachers use: AdamW, warmup + cosine, clipping, AMP, DDP, resume.

One ``fit`` runs epochs of ``train_one_epoch`` (+ ``evaluate`` when a test set is given), writes one JSON line of
metrics per epoch, and after every epoch atomically rewrites a training-state checkpoint.  What is trained and
how its loss is computed is the caller's ``loss_fn(model, batch, step) -> (loss, parts)``: the student's Eq. 1 with
cached or live teachers, or a teacher's plain cross-entropy.

Exact resume: the data position is the epoch boundary and everything random is a function of (seed, epoch,
rank) — the shard order, the views (counter-based), and the torch generator, which is re-seeded at the start of
every epoch (also for dropout / drop-path).  The lr is a pure function of the optimiser step.  So a run killed
mid-epoch and resumed from the last checkpoint replays that epoch bit for bit and ends with the same weights.

GPU notes: batches stay uint8 until ``.to(device, non_blocking=True)`` from pinned memory; metrics accumulate
in device tensors and are read (one host sync) every ``log_interval`` steps and once per epoch; AMP (bf16, or
fp16 with a grad scaler) on CUDA only; DDP with ``Join`` so ranks whose share is one batch shorter do not hang.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from shared.errors import CitUserError
from shared.io import atomic_write_bytes, atomic_write_text

LossFn = Callable[[nn.Module, "object", int], tuple[torch.Tensor, dict[str, torch.Tensor]]]   # (model, batch, step)


@dataclass
class TrainConfig:
    """``[train]``: optimisation and run options (DeiT-style defaults scaled to small models)."""
    epochs: int = 10
    batch_size: int = 64                # per rank
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0              # max grad norm; 0 = off
    amp: str = "auto"                   # auto (bf16 if supported, else fp16) | bf16 | fp16 | off; CUDA only
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_interval: int = 20              # steps between progress-bar updates (each is one host sync)
    eval_every: int = 1                 # evaluate on the test set every N epochs (and always after the last)
    progress: bool = True
    debug_rows: bool = False            # write the rows each rank trains on to <out>/rows.rank<R>.jsonl
    debug_kill_at_step: int = 0         # SIGKILL this process after that many optimiser steps (resume tests)

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"train.amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"train.epochs and train.batch_size must be >= 1, got {self.epochs}, {self.batch_size}")


class CheckpointError(CitUserError):
    """A training-state checkpoint is missing, corrupt or from a different run; the message names the file."""


# -----------------------------------------------------------------------------------------------------------------
# Distributed setup

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local}" if use_cuda and ":" not in device else device if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True     # fixed input sizes: let cuDNN pick the fastest kernels
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(dev, rank, dist.get_world_size() if dist.is_initialized() else 1)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{rank}".encode(), digest_size=8).digest(), "little") >> 1


# -----------------------------------------------------------------------------------------------------------------
# Optimiser and schedule

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases (1-d params) and on what the model lists (tokens, positional embedding)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one: on the CPU torch's default is a loop over the tensors,
    ~5× slower for cit_nano (``benchmarks/bench_train.py --part join``: ``adamw_step_ms``); on CUDA one launch
    for every parameter."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=fused or None)


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Linear warmup from 0, then cosine down to ``min_lr`` at the last step: a pure function of the step."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------------------------------------------
# Training-state checkpoints: one safetensors file (tensors) whose header metadata holds the JSON rest.  No
# pickle; written to a temp file and renamed; a digest over every tensor's bytes catches silent corruption.

def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode() + b"\0" + str(t.dtype).encode() + b"\0")
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Model + optimiser + RNG + ``meta`` (epoch, step, config, ...) -> one file, atomically."""
    from safetensors.torch import save
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt["param_groups"]]
    info = {"format": "cit-train-state/1", "meta": meta, "param_groups": groups, "digest": _tensor_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata={"cit": json.dumps(info)}))


def load_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a training-state file; ``CheckpointError`` if it is missing, truncated or corrupt."""
    from safetensors.torch import load
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no training state to resume from at {path}") from None
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        info = json.loads(header["__metadata__"]["cit"])
        tensors = load(data)
    except Exception as exc:   # struct/json/safetensors errors: all mean the file is damaged
        raise CheckpointError(f"training state {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                              "delete it to start over, or restore a good copy") from None
    if info.get("format") != "cit-train-state/1":
        raise CheckpointError(f"{path} is not a cit training state (format {info.get('format')!r})")
    if _tensor_digest(tensors) != info["digest"]:
        raise CheckpointError(f"training state {path} is corrupt: its tensors do not match the stored digest")
    return tensors, info


def restore_state(tensors: dict[str, torch.Tensor], info: dict, model: nn.Module,
                  optimizer: torch.optim.Optimizer) -> dict:
    """Load model/optimiser/RNG from ``load_state``'s result; returns the stored meta."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in info["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return info["meta"]


# -----------------------------------------------------------------------------------------------------------------
# The loop

class MetricSums:
    """Running sums of named scalars, weighted by batch size, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device):
        self.device, self.sums, self.count = device, {}, 0

    def add(self, values: dict[str, torch.Tensor], n: int) -> None:
        for k, v in values.items():
            v = v.detach().float() * n
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += n

    def reduce(self, runtime: Runtime) -> tuple[dict[str, float], int]:
        """Means over every rank (one all-reduce, one host sync)."""
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.count), device=self.device)])
        if runtime.distributed:
            dist.all_reduce(stacked)
        values = stacked.tolist()
        count = int(round(values[-1]))
        return {k: v / max(count, 1) for k, v in zip(keys, values[:-1])}, count


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, runtime: Runtime, *, epoch: int, step: int, steps_per_epoch: int,
                    scaler: torch.amp.GradScaler | None = None, amp: torch.dtype | None = None,
                    rows_log=None, total_batches: int = 0) -> tuple[dict[str, float], int]:
    """One epoch over ``loader``; returns (mean metrics over all ranks, global step after the epoch)."""
    model.train()
    sums = MetricSums(runtime.device)
    bar = _bar(total_batches, f"epoch {epoch}", cfg.progress and runtime.main)
    join = runtime.distributed and isinstance(model, nn.parallel.DistributedDataParallel)
    ctx = dist.algorithms.Join([model]) if join else contextlib.nullcontext()
    with ctx:
        for i, batch in enumerate(loader):
            if rows_log is not None:
                rows_log.extend(batch.rows.tolist())     # host tensor: no device sync
            lr = lr_at(step, cfg, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch.to(runtime.device)
            with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
                loss, parts = loss_fn(model, batch, step)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip_grad > 0:
                parts = dict(parts, grad_norm=nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            sums.add(parts, len(batch))
            if cfg.debug_kill_at_step and step >= cfg.debug_kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)   # a real kill -9: no cleanup, no flush
            if bar is not None:
                bar.update(1)
                if (i + 1) % cfg.log_interval == 0:
                    bar.set_postfix(loss=f"{(sums.sums['loss'] / sums.count).item():.4f}", lr=f"{lr:.2e}")
    if bar is not None:
        bar.close()
    metrics, count = sums.reduce(runtime)
    metrics["samples"] = count
    return metrics, step


@torch.no_grad()
def evaluate(outputs_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], loader: DataLoader,
             runtime: Runtime, amp: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 accuracy of each named output of ``outputs_fn(views) -> {name: logits}``, over every rank."""
    correct: dict[str, torch.Tensor] = {}
    total = 0
    for batch in loader:
        batch = batch.to(runtime.device)
        with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
            outputs = outputs_fn(batch.views)
        for name, logits in outputs.items():
            hit = (logits.argmax(1) == batch.labels).sum()
            correct[name] = correct[name] + hit if name in correct else hit
        total += len(batch)
    names = sorted(correct)
    stacked = torch.stack([correct[n].float() for n in names] + [torch.tensor(float(total), device=runtime.device)]) \
        if names else torch.tensor([float(total)], device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(stacked)
    values = stacked.tolist()
    count = max(values[-1], 1.0)
    return {f"acc_{n}": v / count for n, v in zip(names, values[:-1])} | {"samples": int(values[-1])}


@dataclass
class FitResult:
    history: list[dict]
    model: nn.Module          # the unwrapped model, trained


def _with_sidecars(outputs: list[str]) -> list[str]:
    from shared.checkpoint import sidecar_path
    return [*outputs, *(sidecar_path(p) for p in outputs if not p.endswith(".json"))]


def claim_out(out_dir: str, outputs: list[str], *, resume: bool, force: bool, main: bool = True) -> None:
    """Never overwrite finished work silently: a run folder whose ``outputs`` (a finished run's files) or training
    state exist needs ``--resume`` (continue it) or ``--force`` (start over: the old files go first, so nothing
    that looks finished is left beside the new run).  Temporary files of a killed write are removed either way."""
    state = os.path.join(out_dir, "state.safetensors")
    finished = [p for p in outputs if os.path.exists(p)]
    if not resume and not force:
        if finished:
            raise CheckpointError(f"{finished[0]} is finished work; pass --force to overwrite it, or choose another "
                                  "--out (--resume continues a run, and only rewrites its outputs if it is finished)")
        if os.path.exists(state):
            raise CheckpointError(f"{out_dir} holds an unfinished run ({state}); pass --resume to continue it or "
                                  "--force to start over")
    if not main:
        return
    if force and not resume:
        for path in [*_with_sidecars(outputs), state, os.path.join(out_dir, "metrics.jsonl")]:
            if os.path.isfile(path):
                os.remove(path)
    remove_temporaries(out_dir, outputs)


def remove_temporaries(out_dir: str, outputs: list[str]) -> None:
    """Leftovers of a write killed before its rename: ``.tmp-*`` in the run folder (training state, metrics,
    run.json), ``.<name>.*.tmp`` / ``.tmp-<name>*`` beside each output.  Never read; they only waste disk."""
    names = {os.path.basename(p) for p in _with_sidecars(outputs)}
    folders = {os.path.abspath(out_dir): None, **{os.path.dirname(os.path.abspath(p)): None for p in outputs}}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            mine = (folder == os.path.abspath(out_dir) and entry.startswith(".tmp-")) or any(
                entry.startswith(f".tmp-{n}") or (entry.startswith(f".{n}.") and entry.endswith(".tmp")) for n in names)
            if mine:
                try:
                    os.remove(os.path.join(folder, entry))
                except OSError:
                    pass


def fit(model: nn.Module, loss_fn: LossFn, train_set, cfg: TrainConfig, runtime: Runtime, out_dir: str, *,
        num_workers: int = 0, eval_fn: Callable[[nn.Module], dict] | None = None, resume: bool = False,
        run_meta: dict | None = None, check_resume: Callable[[dict], None] | None = None,
        find_unused_parameters: bool = False) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs of ``train_set`` (a ``TrainViews``), checkpointing each epoch.

    ``run_meta`` is stored in the checkpoint; on ``resume`` the stored one is passed to ``check_resume`` (which
    raises if the run differs) before anything is loaded into the model."""
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, "state.safetensors")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    model.to(runtime.device)
    optimizer = make_optimizer(model, cfg, runtime.device)
    start_epoch, step, history = 0, 0, []
    if resume:
        tensors, info = load_state(state_path)
        if check_resume is not None:
            check_resume(info["meta"].get("run", {}))
        meta = restore_state(tensors, info, model, optimizer)
        start_epoch, step, history = meta["epoch"] + 1, meta["step"], meta.get("history", [])
    amp = amp_dtype(cfg, runtime.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    wrapped = model
    if runtime.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    from trainer.data import make_loader
    loader = make_loader(train_set, cfg.batch_size, num_workers, pin_memory=runtime.device.type == "cuda")
    per_rank = [train_set.num_batches(cfg.batch_size, num_workers, rank=r) for r in range(runtime.world)]
    steps_per_epoch = max(per_rank)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, runtime.rank))
        train_set.set_epoch(epoch)
        rows = [] if cfg.debug_rows else None
        started, cpu_started = time.perf_counter(), time.process_time()
        metrics, step = train_one_epoch(wrapped, loader, loss_fn, optimizer, cfg, runtime, epoch=epoch, step=step,
                                        steps_per_epoch=steps_per_epoch, scaler=scaler, amp=amp, rows_log=rows,
                                        total_batches=per_rank[runtime.rank])
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        record = {"epoch": epoch, "view": train_set.view, "step": step, "lr": lr_at(step - 1, cfg, steps_per_epoch),
                  **{f"train_{k}": v for k, v in metrics.items()}, "seconds": seconds,
                  "cpu_seconds": cpu_seconds,       # this process only (not DataLoader workers)
                  "samples_per_s": metrics["samples"] / max(seconds, 1e-9)}
        if rows is not None:
            with open(os.path.join(out_dir, f"rows.rank{runtime.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch, "rank": runtime.rank, "rows": rows}) + "\n")
        if eval_fn is not None and ((epoch + 1) % max(cfg.eval_every, 1) == 0 or epoch + 1 == cfg.epochs):
            record |= {f"test_{k}": v for k, v in eval_fn(model).items()}
        history.append(record)
        if runtime.main:   # state first, then the metrics rewritten from it: a kill between leaves both consistent
            save_state(state_path, model, optimizer,
                       {"epoch": epoch, "step": step, "history": history, "run": run_meta or {}})
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
            if cfg.progress:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
                print(json.dumps(shown), flush=True)
        if runtime.distributed:
            dist.barrier()
    return FitResult(history, model)


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def config_dict(*sections) -> dict:
    return {type(s).__name__: asdict(s) for s in sections}
