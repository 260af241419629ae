"""Objectives: a recipe is one class that turns the student's per-head logits and a batch's ``Targets`` into a loss.

    cit    Eq. 1 (``trainer.losses.CiTLoss``): λ0·CE(cls) + Σ λ_t·τ_t²·KL(q_t ‖ σ(z_head/τ_t))
    kd     one-head KD (Hinton): (1 − α)·CE(cls) + α·τ²·KL(q̄ ‖ σ(z_cls/τ)), q̄ = the teachers' distributions averaged
    hard   DeiT hard distillation: λ0·CE(cls, y) + Σ λ_t·CE(z_head, top-1 of teacher t)

and, added to any of them (``FeatureKD``, weights ``objective.feature_weight`` β / ``relation_weight`` γ):

    + Σ_t β·MSE(P_t·s_t, f_t) + γ·MSE(cos(s_t), cos(f_t))

per mapped teacher t, with f_t its pooled features and s_t the student's pooled features that t's head reads
(``FeatureStudent``).

Every objective has ``heads`` (the student heads it trains), ``weights(step)`` (its term weights at an optimiser
step, after the schedule) and ``__call__(outputs, targets, step) -> (loss, parts)`` with detached device-tensor
parts (no host sync).  A ``WeightSchedule`` moves the distillation weights over training; when it is not constant
the weights are logged too (``w_<term>``: the per-epoch mean in ``metrics.jsonl``).  A new recipe is one new class
here and one entry in ``RECIPES``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.losses import CiTLoss, KDTerm, kd_kl, label_ce
from trainer.targets import Targets


def model_outputs(out) -> dict[str, torch.Tensor]:
    """Normalise a model's training output to {head: logits} (a teacher returns one tensor: its ``cls``)."""
    if isinstance(out, dict):
        return out
    if isinstance(out, torch.Tensor):
        return {"cls": out}
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor or a dict of head logits")


@dataclass(frozen=True)
class WeightSchedule:
    """Factor on the distillation weights at optimiser step ``step`` of ``total_steps``, p = step / (total − 1):

        constant  1
        linear    final + (1 − final)·(1 − p)
        cosine    final + (1 − final)·(1 + cos πp)/2

    So the first step has the configured weight, the last ``final`` times it, and the middle step (p = ½) the mean
    of the two under both decays.  Like the learning rate, a pure function of the step (exact resume)."""
    kind: str = "constant"
    final: float = 0.0
    total_steps: int = 1

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        p = min(step / max(self.total_steps - 1, 1), 1.0)
        shape = 1.0 - p if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return self.final + (1.0 - self.final) * shape


class Objective(Protocol):
    heads: frozenset[str]

    def weights(self, step: int) -> dict[str, float]: ...

    def __call__(self, outputs: dict[str, torch.Tensor], targets: Targets, step: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def _log_weights(parts: dict, loss: torch.Tensor, weights: dict[str, float], schedule: WeightSchedule) -> dict:
    if schedule.kind != "constant":
        parts.update({f"w_{name}": loss.detach().new_full((), w) for name, w in weights.items()})
    return parts


class CiTObjective:
    """Eq. 1, unchanged: ``CiTLoss`` with its term weights scaled by the schedule."""

    def __init__(self, criterion: CiTLoss, schedule: WeightSchedule = WeightSchedule()):
        self.criterion, self.schedule = criterion, schedule
        self.base_terms = list(criterion.terms)
        self.heads = frozenset({"cls"} | {t.head for t in self.base_terms})

    def weights(self, step: int) -> dict[str, float]:
        f = self.schedule.factor(step)
        return {"ce": self.criterion.cfg.lambda0, **{f"kd_{t.slot}": t.weight * f for t in self.base_terms}}

    def __call__(self, outputs, targets: Targets, step: int):
        # the factor is a Python float: the terms' weights stay on the device, unchanged (no per-step copy there)
        loss, parts = self.criterion(outputs, targets.labels, targets.teachers, targets.mix,
                                     kd_scale=self.schedule.factor(step))
        return loss, _log_weights(parts, loss, {k: v for k, v in self.weights(step).items() if k != "ce"},
                                  self.schedule)


class OneHeadKD:
    """Hinton KD on the class head: (1 − α)·CE + α·τ²·KL(q̄ ‖ σ(z_cls/τ)); q̄ = mean of the teachers' probabilities
    at τ (one teacher: its own).  The schedule moves α."""

    def __init__(self, teachers: list[str], alpha: float, tau: float, label_smoothing: float,
                 schedule: WeightSchedule = WeightSchedule()):
        if not teachers:
            raise ValueError("one-head KD needs at least one teacher")
        self.teachers, self.alpha, self.tau = list(teachers), alpha, tau
        self.label_smoothing, self.schedule = label_smoothing, schedule
        self.heads = frozenset({"cls"})

    def weights(self, step: int) -> dict[str, float]:
        a = self.alpha * self.schedule.factor(step)
        return {"ce": 1.0 - a, "kd": a}

    def teacher_log_probs(self, targets: Targets) -> torch.Tensor:
        logs = torch.stack([targets.log_probs(t, self.tau) for t in self.teachers])
        return torch.logsumexp(logs, 0) - math.log(len(self.teachers))

    def __call__(self, outputs, targets: Targets, step: int):
        w = self.weights(step)
        logits = outputs["cls"]
        ce = label_ce(logits, targets.labels, targets.mix, self.label_smoothing)
        kl = kd_kl(logits, self.teacher_log_probs(targets), self.tau)
        loss = w["ce"] * ce + w["kd"] * kl
        parts = {"ce": ce.detach(), "kd": kl.detach(), "loss": loss.detach()}
        return loss, _log_weights(parts, loss, w, self.schedule)


class HardDistillation:
    """DeiT's hard distillation: each term's head fits its teacher's top-1 class by plain CE (weight λ of the
    term's slot); the class head fits the labels (λ0, smoothed).  The schedule moves the distillation weights."""

    def __init__(self, terms: list[KDTerm], lambda0: float, label_smoothing: float,
                 schedule: WeightSchedule = WeightSchedule()):
        self.terms, self.lambda0, self.label_smoothing, self.schedule = terms, lambda0, label_smoothing, schedule
        self.heads = frozenset({"cls"} | {t.head for t in terms})

    def weights(self, step: int) -> dict[str, float]:
        f = self.schedule.factor(step)
        return {"ce": self.lambda0, **{f"kd_{t.slot}": t.weight * f for t in self.terms}}

    def __call__(self, outputs, targets: Targets, step: int):
        w = self.weights(step)
        ce = label_ce(outputs["cls"], targets.labels, targets.mix, self.label_smoothing)
        loss = w["ce"] * ce
        parts = {"ce": ce.detach()}
        for term in self.terms:
            hard = F.cross_entropy(outputs[term.head].float(), targets.top1(term.teacher))
            loss = loss + w[f"kd_{term.slot}"] * hard
            parts[f"kd_{term.slot}"] = hard.detach()
        parts["loss"] = loss.detach()
        return loss, _log_weights(parts, loss, {k: v for k, v in w.items() if k != "ce"}, self.schedule)


@dataclass
class ObjectiveSpec:
    """What a recipe is built from: the run's config, the KD terms mapped to heads, classes and cache facts."""
    cfg: object                      # trainer.config.RunConfig
    terms: list[KDTerm]
    num_classes: int
    temperatures: list[float] | None
    cache_topk: int
    schedule: WeightSchedule


def _cit(spec: ObjectiveSpec) -> CiTObjective:
    return CiTObjective(CiTLoss(spec.cfg.loss, spec.terms, spec.num_classes, temperatures=spec.temperatures,
                                cache_topk=spec.cache_topk), spec.schedule)


def _kd(spec: ObjectiveSpec) -> OneHeadKD:
    o = spec.cfg.objective
    return OneHeadKD([t.teacher for t in spec.terms], o.alpha, o.tau, spec.cfg.loss.label_smoothing, spec.schedule)


def _hard(spec: ObjectiveSpec) -> HardDistillation:
    return HardDistillation(spec.terms, spec.cfg.loss.lambda0, spec.cfg.loss.label_smoothing, spec.schedule)


RECIPES = {"cit": _cit, "kd": _kd, "hard": _hard}


# ---------------------------------------------------------------------------------------------------------------
# Feature and relation KD, on top of any recipe

POOLED, PROJECTED = "_pooled", "_projected"     # keys of a FeatureStudent's training output beside the heads


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) cosine similarities of the batch's rows (fp32)."""
    x = F.normalize(x.float(), dim=1)
    return x @ x.t()


def relation_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the batch's cosine-similarity matrices of student and teacher features (mean over B×B)."""
    return F.mse_loss(cosine_matrix(student), cosine_matrix(teacher))


class FeatureStudent(nn.Module):
    """The student plus one learned linear projection per feature-KD teacher (D_student -> D_teacher), so the
    projections are trained, checkpointed and resumed with the student (and all-reduced under DDP: they run in its
    forward).  In training mode the output is the student's ``{head: logits}`` plus ``_pooled``: ``{head: (B, D)}``
    and ``_projected``: ``{teacher: (B, D_teacher)}``; in eval mode it is the student's own output.

    The student's pooled features of a head (``forward_pooled``): for a CiT the token that head reads after the
    final norm — the conv token for the conv teacher's term, the inv token for the inv teacher's, the class token
    in the one-head recipes or with ``kd.shared_token``; for a timm student the pooled features every head reads."""

    def __init__(self, student: nn.Module, pairs: list[tuple[str, str, int]], project: bool):
        super().__init__()
        self.student = student
        self.pairs = [(teacher, head) for teacher, head, _ in pairs]      # (teacher, the student head it feeds)
        width = getattr(student, "num_features", None) or student.embed_dim
        self.projections = nn.ModuleDict({teacher: nn.Linear(width, dim) for teacher, _, dim in pairs}
                                         if project else {})

    def forward(self, x: torch.Tensor):
        if not self.training:              # inference: the student as it is
            return self.student(x)
        pooled = self.student.forward_pooled(x)
        heads = {h: head(pooled[h]) for h, head in self.student.head_modules().items()}
        projected = {t: self.projections[t](pooled[h]) for t, h in self.pairs if t in self.projections}
        return {**heads, POOLED: pooled, PROJECTED: projected}

    def forward_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student.forward_heads(x)

    def no_weight_decay(self) -> set[str]:
        inner = self.student.no_weight_decay() if hasattr(self.student, "no_weight_decay") else set()
        return {f"student.{n}" for n in inner}


class FeatureKD:
    """A recipe plus, per (slot, teacher, head) term: β·MSE(P_t·s, f_t) (mean over B×D_t) and γ·MSE of the
    (B, B) cosine-similarity matrices of s and f_t; s = the student's pooled features of ``head`` (the
    ``FeatureStudent`` output), f_t = ``Targets.pooled(t)``.  Constant weights (the schedule moves the recipe's)."""

    def __init__(self, base: Objective, terms: list[tuple[str, str, str]], feature_weight: float,
                 relation_weight: float):
        self.base, self.terms = base, list(terms)
        self.feature_weight, self.relation_weight = feature_weight, relation_weight
        self.heads = base.heads

    def weights(self, step: int) -> dict[str, float]:
        extra = {}
        for slot, _, _ in self.terms:
            if self.feature_weight:
                extra[f"feat_{slot}"] = self.feature_weight
            if self.relation_weight:
                extra[f"rel_{slot}"] = self.relation_weight
        return {**self.base.weights(step), **extra}

    def __call__(self, outputs, targets: Targets, step: int):
        loss, parts = self.base(outputs, targets, step)
        for slot, teacher, head in self.terms:
            f = targets.pooled(teacher).float()
            if self.feature_weight:
                feat = F.mse_loss(outputs[PROJECTED][teacher].float(), f)
                loss = loss + self.feature_weight * feat
                parts[f"feat_{slot}"] = feat.detach()
            if self.relation_weight:
                rel = relation_kd(outputs[POOLED][head], f)
                loss = loss + self.relation_weight * rel
                parts[f"rel_{slot}"] = rel.detach()
        parts["loss"] = loss.detach()
        return loss, parts


def build_objective(spec: ObjectiveSpec) -> Objective:
    """The recipe, with the feature / relation KD terms when their weights are set."""
    objective = RECIPES[spec.cfg.objective.recipe](spec)
    o = spec.cfg.objective
    if not o.uses_features:
        return objective
    return FeatureKD(objective, [(t.slot, t.teacher, t.head) for t in spec.terms], o.feature_weight,
                     o.relation_weight)
