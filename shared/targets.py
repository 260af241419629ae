"""The teacher target model: what the cache keeps of a teacher's full logits, and the distribution rebuilt from it.

From a teacher's full logits z (C classes) the builder keeps, per view, for the cached temperatures τ_1..τ_S:

    logp_i = z_i − logsumexp(z)                            the K largest, sorted descending (top-k log-probabilities)
    tail_s = log Σ_{j ∉ top-k} softmax(z/τ_s)_j            the tail log-mass at τ_s, fp32 from the full logits

The teacher's distribution at a cached τ_s is then exact on the top-k and in its tail mass m = e^{tail_s}:

    q_i = (1 − m) · softmax(logp/τ_s)_i     for the top-k (tempering keeps their relative weights: z_i/τ + const)
    q_j = m / (C − K)                       for every other class (the tail's shape is not kept: spread uniformly)

One number per extra temperature suffices: the offset c_τ = lse(z)/τ − lse(z/τ) of the tempered top-k
log-probabilities is implied by the tail mass.  The tail log-mass is never 1 − Σ p from rounded values (with
C = 1000 and confident teachers that is exactly 0 in a fifth of the rows or more); stored in fp16 its absolute
error is at most e⁻¹·2⁻¹¹ ≈ 2e-4.

``target_log_probs`` builds the dense (B, C) log-probabilities at one τ from these numbers; online teachers go
through ``encode_logits`` + ``target_log_probs`` too, so cached and live targets are one model (``topk = C`` or
an empty tail gives the teacher's full tempered distribution).  At a τ that was not cached
``uncached_estimate`` takes the nearest cached τ0's target with a flat tail and tempers it by τ0/τ: exact on
the top-k's relative weights, the tail mass approximate (a flat tail overstates it for τ > τ0).
"""
from __future__ import annotations

import math

import torch

TAIL_MODES = ("uniform", "renormalize")


def encode_logits(logits: torch.Tensor, k: int, temperatures: tuple[float, ...] | list[float]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits (..., C) -> (top-k log-probs (..., K) sorted descending, their classes (..., K), tail log-mass at
    each temperature (..., S)); fp32, on the logits' device, no host sync.  With K = C the tail log-mass is −inf.
    Leading dimensions (rows, or teachers × rows) are batched over."""
    z = logits.float()
    values, indices = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    logp = values - torch.logsumexp(z, dim=-1, keepdim=True)
    tails = []
    for tau in temperatures:
        zt = z / tau
        rest = zt.scatter(-1, indices, -math.inf)              # the non-top-k logits only
        tails.append(torch.logsumexp(rest, dim=-1) - torch.logsumexp(zt, dim=-1))
    tail = torch.stack(tails, dim=-1).clamp_max(0.0)           # fp32 rounding may leave +1e-7
    return logp, indices, tail


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0: exact near x → 0⁻ (a tail holding almost all the mass), absolute error ≤ 6e-8
    as x → −inf, where the result is ~−eˣ: what a log-probability needs (its fp16 top-k are coarser), in three
    ops instead of the two-branch form that also keeps the relative error of that tiny result."""
    return torch.log(torch.expm1(x.clamp_max(0.0)).neg_())


def tempered(x: torch.Tensor, tau) -> torch.Tensor:
    """x / τ, as a float32 tensor; at τ = 1 (a number) no op runs: the common case costs nothing on small batches,
    where a step's KD part is counted in ops, not flops."""
    x = x.float()
    return x if isinstance(tau, (int, float)) and tau == 1 else x / tau


def target_log_probs(logp: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, tau, num_classes: int,
                     topk: int = 0, mode: str = "uniform") -> torch.Tensor:
    """Dense (..., C) fp32 log-probabilities of the teacher at temperature ``tau``.

    ``logp``/``indices``: (..., K) top-k log-probabilities (at τ = 1, sorted descending) and classes; ``tail``:
    (...,) tail log-mass at ``tau`` (exact when cached at ``tau``).  Leading dimensions are batched over: (B, K)
    for one teacher, (T, B, K) for all teachers of a step at once, then ``tau`` may be a tensor broadcasting to
    (T, 1, 1) (one temperature per teacher).  ``topk = k < K`` keeps the first k classes and adds the dropped
    classes' mass to the tail (exact too).  ``mode = "renormalize"`` drops the tail instead and renormalises the
    top-k (biased; for comparison)."""
    if mode not in TAIL_MODES:
        raise ValueError(f"tail mode must be one of {TAIL_MODES}, got {mode!r}")
    *lead, kk = logp.shape
    k = min(topk or kk, kk)
    scaled = tempered(logp, tau)
    if mode == "renormalize":
        top = torch.log_softmax(scaled[..., :k], dim=-1)
        fill = None
    elif k == num_classes:                                    # every class kept: no tail (its log-mass is −inf)
        top, fill = torch.log_softmax(scaled, dim=-1), None
    else:
        tail = tail.float().unsqueeze(-1)
        top = log1mexp(tail) + torch.log_softmax(scaled, dim=-1)
        if k < kk:                                            # the dropped classes join the tail
            tail = torch.logaddexp(tail, torch.logsumexp(top[..., k:], dim=-1, keepdim=True))
            top = top[..., :k]
        fill = tail - math.log(num_classes - k)
    dense = (torch.full((*lead, num_classes), -math.inf, device=logp.device) if fill is None
             else fill.expand(*lead, num_classes).clone())
    return dense.scatter_(-1, indices[..., :k].long(), top)


def nearest_temperature(tau: float, temperatures) -> int:
    """Index of the cached temperature closest to ``tau`` on a log scale."""
    return min(range(len(temperatures)), key=lambda s: abs(math.log(tau) - math.log(temperatures[s])))


def uncached_estimate(logp: torch.Tensor, indices: torch.Tensor, tails: torch.Tensor, temperatures, tau: float,
                        num_classes: int, topk: int = 0) -> torch.Tensor:
    """The approximation for a τ that was not cached: the nearest cached τ0's target (flat tail) tempered by
    τ0/τ.  Top-k relative weights stay exact; the tail mass is off (a flat tail overstates it for τ > τ0)."""
    s = nearest_temperature(tau, temperatures)
    base = target_log_probs(logp, indices, tails[..., s], temperatures[s], num_classes, topk)
    return torch.log_softmax(base * (temperatures[s] / tau), dim=-1)


def online_log_probs(logits: torch.Tensor, k: int, tau: float, num_classes: int, mode: str = "uniform"
                     ) -> torch.Tensor:
    """The same target model from live full logits (``k = 0``: every class, i.e. the exact tempered softmax)."""
    k = k if 0 < k < num_classes else num_classes
    logp, indices, tail = encode_logits(logits, k, (tau,))
    return target_log_probs(logp, indices, tail[..., 0], tau, num_classes, k, mode)
