"""The CiT objective (Eq. 1) and the teacher distribution rebuilt from the cache.

    L = λ0·CE_ls(z_cls, y) + λ1·τ1²·KL(σ(t1/τ1) ‖ σ(z_conv/τ1)) + λ2·τ2²·KL(σ(t2/τ2) ‖ σ(z_inv/τ2))

KL uses batchmean reduction (sum over classes, mean over the batch) times τ², as in the paper's code; DeiT's
``reduction="sum" / numel`` would be C times smaller and change the λ balance.

The cache holds, per view and teacher, the top-k logits v_1..v_K, their classes, and lse = log Σ_c exp(z_c) of the
*full* logits.  We rebuild dense *reconstructed logits* ẑ (B, C):

    ẑ_i = v_i                                   for the K cached classes
    ẑ_j = lse + log(m / (C − K)),  m = 1 − Σ_i exp(v_i − lse)   for every other class (the tail)

so every tail class carries an equal share of the tail mass m and σ(ẑ) reproduces the teacher's top-k
probabilities exactly with the right total tail mass (logsumexp(ẑ) = lse).  At τ ≠ 1 we temper ẑ, i.e. the
tail is treated as flat *before* tempering: exact for the top-k at τ = 1, an approximation of the tail otherwise
(the true tail's shape is unknown).  With K = C there is no tail and ẑ is the teacher's logits (in fp16).
``topk=k`` (below the cache's K) keeps only the first k cached classes, to measure how accuracy depends on K
from one full cache; online teachers' dense logits are cut the same way, so cached and online KD stay comparable.
``tail="renormalize"`` instead drops the tail (ẑ_j = −inf), i.e. renormalises the top-k: biased toward the
top-k, available for comparison only.  If fp16 rounding makes m ≤ 0 the tail gets zero mass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.mixing import mixed_targets

HEADS = ("cls", "conv", "inv")


@dataclass
class LossConfig:
    """``[loss]``: the weights and temperatures of Eq. 1 (paper and official code: all 1)."""
    lambda0: float = 1.0            # CE on the class token
    lambda1: float = 1.0            # KD term of the conv teacher
    lambda2: float = 1.0            # KD term of the inv teacher
    tau1: float = 1.0
    tau2: float = 1.0
    label_smoothing: float = 0.1    # on the CE term only (DeiT recipe)
    tail: str = "uniform"           # uniform | renormalize: what to do with the mass outside the cached top-k
    topk: int = 0                   # use the teacher's top-k classes only (0: all the cache holds)

    def __post_init__(self) -> None:
        if self.topk < 0:
            raise ValueError(f"loss.topk must be >= 0 (0: all cached classes), got {self.topk}")
        if self.tail not in ("uniform", "renormalize"):
            raise ValueError(f"loss.tail must be 'uniform' or 'renormalize', got {self.tail!r}")
        if self.tau1 <= 0 or self.tau2 <= 0:
            raise ValueError(f"loss temperatures must be positive, got tau1={self.tau1}, tau2={self.tau2}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def reconstruct_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int,
                       tail: str = "uniform") -> torch.Tensor:
    """Dense (B, C) float32 logits from cached top-k ``values`` (B, K), ``indices`` (B, K) and ``lse`` (B,).

    See the module docstring; runs on whatever device the inputs are on, no host sync."""
    values = values.float()
    lse = lse.float()
    b, k = values.shape
    if k > num_classes:
        raise ValueError(f"cache has K={k} > C={num_classes} classes")
    if k == num_classes or tail == "renormalize":
        fill = torch.full((b, 1), -math.inf, device=values.device)
    else:
        top_mass = torch.exp(values - lse[:, None]).sum(1, keepdim=True)
        tail_mass = (1.0 - top_mass).clamp_min(0.0)            # 0 -> log 0 = -inf: the tail gets no mass
        fill = lse[:, None] + torch.log(tail_mass) - math.log(num_classes - k)
    logits = fill.expand(b, num_classes).clone()
    return logits.scatter_(1, indices.long(), values)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(σ(t/τ) ‖ σ(s/τ)), batchmean.  Teacher classes with zero probability (−inf logits) add nothing."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    p_t = log_p_t.exp()
    kl = torch.special.xlogy(p_t, p_t) - p_t * log_p_s         # xlogy(0, 0) = 0: -inf teacher logits are safe
    return kl.sum() / student_logits.shape[0] * (tau * tau)


@dataclass
class MixInfo:
    """How a batch was mixed.  ``partner_index`` is set only when the teachers' distributions must be mixed in
    the loss (``approx`` mode with cached teachers); in ``exact`` mode, and for online teachers, the teachers
    already saw the mixed image."""
    partner_labels: torch.Tensor
    lam: torch.Tensor
    partner_index: torch.Tensor | None = None


def mix_teacher_logits(logits: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``approx`` mode: log(λ·σ(z_a) + (1−λ)·σ(z_b)) — the linear mix of the two views' teacher distributions
    (what FKD/ReLabel do; an approximation of what the teacher would say about the mixed image)."""
    lam = lam.view(-1, 1).float()
    own = F.log_softmax(logits.float(), dim=1) + torch.log(lam)          # log 0 = -inf: logaddexp drops it
    other = F.log_softmax(logits.float()[partner], dim=1) + torch.log1p(-lam)
    return torch.logaddexp(own, other)


@dataclass
class KDTerm:
    """One distillation term: student head ``head`` fits teacher ``teacher`` with weight λ and temperature τ.
    ``slot`` is the term's place in Eq. 1 (``conv`` = λ1/τ1, ``inv`` = λ2/τ2), used to name it in metrics."""
    slot: str
    head: str
    teacher: str
    weight: float
    tau: float


class CiTLoss(torch.nn.Module):
    """Eq. 1 over the student's per-head logits.

    ``terms`` maps teachers to heads: conv teacher -> ``conv`` head, inv teacher -> ``inv`` head for CiT, or every
    teacher -> ``cls`` head for the one-token variant.  ``forward`` returns the total loss and its detached parts
    (device tensors: the caller decides when to sync)."""

    def __init__(self, cfg: LossConfig, terms: list[KDTerm], num_classes: int):
        super().__init__()
        if cfg.topk > num_classes:
            raise ValueError(f"loss.topk={cfg.topk} is more than the {num_classes} classes")
        self.cfg, self.terms, self.num_classes = cfg, terms, num_classes

    def teacher_logits(self, targets: dict) -> dict[str, torch.Tensor]:
        """Teacher name -> dense logits.  A target is either dense logits (online KD) or a cached
        ``(values, indices, lse)`` triple."""
        k = self.cfg.topk
        out = {}
        for name, target in targets.items():
            if isinstance(target, torch.Tensor):
                if not k or k >= self.num_classes:
                    out[name] = target
                    continue
                values, indices = torch.topk(target.float(), k, dim=1)
                target = (values, indices, torch.logsumexp(target.float(), dim=1))
            elif k:
                target = (target[0][:, :k], target[1][:, :k], target[2])     # the cache's top-K is sorted
            out[name] = reconstruct_logits(*target, self.num_classes, self.cfg.tail)
        return out

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, targets: dict | None = None,
                mix: "MixInfo | None" = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if mix is None:
            ce = F.cross_entropy(outputs["cls"].float(), labels, label_smoothing=self.cfg.label_smoothing)
        else:   # mixed labels λ·y + (1−λ)·y_partner, each smoothed (timm's mixup targets)
            soft = mixed_targets(labels, mix.partner_labels, mix.lam, self.num_classes, self.cfg.label_smoothing)
            ce = torch.sum(-soft * F.log_softmax(outputs["cls"].float(), dim=1), dim=1).mean()
        loss = self.cfg.lambda0 * ce
        parts = {"ce": ce.detach()}
        if self.terms:
            teachers = self.teacher_logits(targets or {})
            if mix is not None and mix.partner_index is not None:
                teachers = {name: mix_teacher_logits(z, mix.lam, mix.partner_index) for name, z in teachers.items()}
            for term in self.terms:
                kl = kd_kl(outputs[term.head], teachers[term.teacher], term.tau)
                loss = loss + term.weight * kl
                parts[f"kd_{term.slot}"] = kl.detach()
        parts["loss"] = loss.detach()
        return loss, parts
