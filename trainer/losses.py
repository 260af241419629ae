"""The CiT objective (Eq. 1) and the teacher distributions it distils.

    L = λ0·CE_ls(z_cls, y) + λ1·τ1²·KL(q1(τ1) ‖ σ(z_conv/τ1)) + λ2·τ2²·KL(q2(τ2) ‖ σ(z_inv/τ2))

KL uses batchmean reduction (sum over classes, mean over the batch) times τ², as in the paper's code; DeiT's
``reduction="sum" / numel`` would be C times smaller and change the λ balance.

q(τ) is the teacher's distribution at τ under one target model (``shared.targets``), the same for cached and
live teachers: its top-k classes carry their true tempered probabilities, the rest of the mass (the true tail mass
at τ) is spread uniformly over the other C − K classes.  From the cache this is exact at every temperature the
cache was built with (``cit cache build --temperatures``); at another τ the nearest cached τ0's target is tempered
by τ0/τ with a flat tail (an approximation: a warning says so).  Online teachers' full logits are cut to the same
top-k (``loss.topk``, else the cache's K when a cache is given, else every class: the exact softmax).
``topk=k`` (below the cache's K) keeps the first k cached classes and moves the others' mass into the tail, to
measure how accuracy depends on K from one full cache.  ``tail="renormalize"`` drops the tail and renormalises the
top-k: biased toward the top-k, available for comparison only.  With ``augment.mix=approx`` the two views' tempered
distributions are mixed linearly (temper first, then mix).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared import targets as target_model
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


def kd_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(q ‖ σ(s/τ)), batchmean; ``teacher_log_probs`` are the teacher's log-probabilities at τ (logits work
    too at τ = 1: they are normalised here).  Classes with zero teacher probability (−inf) add nothing."""
    log_q = F.log_softmax(teacher_log_probs.float(), dim=-1)
    return kd_kl_stacked(student_logits.unsqueeze(0), log_q.unsqueeze(0), tau)[0]


class CachedTargets(Mapping):
    """A batch's cached top-k of its teachers as the loader stacked them: ``logp`` and ``indices`` (T, B, K),
    ``tail`` (T, B, S).  A mapping teacher -> ``(logp, indices, tail)`` for code that wants one teacher; the loss
    takes all its terms' rows with ``stacked``, so a step does not re-stack what the loader already stacked."""

    def __init__(self, names: list[str], logp: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor):
        self.names, self.logp, self.indices, self.tail = list(names), logp, indices, tail

    @classmethod
    def of(cls, targets: Mapping) -> "CachedTargets":
        """Per-teacher triples (a plain dict) stacked once."""
        if isinstance(targets, CachedTargets):
            return targets
        names = list(targets)
        return cls(names, *(torch.stack([targets[n][f] for n in names]) for f in range(3)))

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self.names:
            raise KeyError(name)
        i = self.names.index(name)
        return self.logp[i], self.indices[i], self.tail[i]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def stacked(self, names: list[str], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, B, K) logp and indices and (U, B) tails at temperature slot ``slots[u]`` of teacher ``names[u]``:
        views of the loader's tensors when the names are its teachers in order (the usual step)."""
        if names == self.names:
            logp, indices, tail = self.logp, self.indices, self.tail
        else:
            pos = [self.names.index(n) for n in names]
            logp, indices, tail = (torch.stack([x[i] for i in pos]) for x in (self.logp, self.indices, self.tail))
        if len(set(slots)) == 1:
            return logp, indices, tail[..., slots[0]]
        return logp, indices, torch.stack([tail[u, :, s] for u, s in enumerate(slots)])


@dataclass
class MixInfo:
    """How a batch was mixed.  ``partner_index`` is set only when the teachers' distributions must be mixed in
    the loss (``approx`` mode with cached teachers); in ``exact`` mode, and for online teachers, the teachers
    already saw the mixed image."""
    partner_labels: torch.Tensor
    lam: torch.Tensor
    partner_index: torch.Tensor | None = None


def mix_log_probs(log_q: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``approx`` mode: log(λ·q_a + (1−λ)·q_b) of two views' teacher distributions *at the KD temperature* (what
    FKD/ReLabel do, tempered first; an approximation of what the teacher would say about the mixed image)."""
    lam = lam.view(-1, 1).float()                                          # (B, 1): broadcasts over teachers too
    own = log_q.float() + torch.log(lam)                                   # log 0 = -inf: logaddexp drops it
    other = log_q.float().index_select(-2, partner) + torch.log1p(-lam)    # (..., B, C): rows of the partners
    return torch.logaddexp(own, other)


def kd_kl_stacked(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, tau) -> torch.Tensor:
    """``kd_kl`` of T terms at once: (T, B, C) student logits and teacher log-probabilities (normalised: the
    target model's sum to one by construction), ``tau`` a float or a (T, 1, 1) tensor; returns the (T,) per-term
    τ²·KL (one log_softmax of all student heads, no host sync).  (A hand-written backward measured no faster on
    the CPU: the autograd engine's fixed cost per backward dominates at these sizes, not the ops.)"""
    log_p_s = F.log_softmax(target_model.tempered(student_logits, tau), dim=-1)
    p_t = teacher_log_probs.float().exp()
    kl = torch.special.xlogy(p_t, p_t) - p_t * log_p_s         # xlogy(0, 0) = 0: -inf teacher entries are safe
    tau2 = (tau * tau).view(-1) if isinstance(tau, torch.Tensor) else tau * tau
    return kl.sum(dim=(1, 2)) * (tau2 / student_logits.shape[1])


@dataclass
class KDTerm:
    """One distillation term: student head ``head`` fits teacher ``teacher`` with weight λ and temperature τ.
    ``slot`` is the term's place in Eq. 1 (``conv`` = λ1/τ1, ``inv`` = λ2/τ2), used to name it in metrics."""
    slot: str
    head: str
    teacher: str
    weight: float
    tau: float


class TargetModel:
    """The teachers' dense log-probabilities under one set of rules — ``loss.topk``, ``loss.tail``, the cache's
    temperatures (None: no cache, targets are live logits) and K (``cache_topk``: what online targets are cut to;
    0: every class) — from cached ``(logp, indices, tail)`` triples or live full logits: one teacher at a time
    (``log_probs``) or every (teacher, τ) of a step at once (``stacked``: one target build, one scatter)."""

    def __init__(self, cfg: LossConfig, num_classes: int, temperatures: list[float] | tuple[float, ...] | None = None,
                 cache_topk: int = 0):
        if cfg.topk > num_classes:
            raise ValueError(f"loss.topk={cfg.topk} is more than the {num_classes} classes")
        self.topk, self.tail, self.num_classes = cfg.topk, cfg.tail, num_classes
        self.temperatures = list(temperatures) if temperatures is not None else None
        self.online_topk = cfg.topk or cache_topk
        self._taus: dict = {}

    def cached_slot(self, tau: float) -> int | None:
        """Index of ``tau`` among the cached temperatures (None: not cached)."""
        for s, cached in enumerate(self.temperatures or ()):
            if math.isclose(tau, cached, rel_tol=1e-6):
                return s
        return None

    def warn_if_not_cached(self, tau: float, option: str) -> None:
        """Say once, before training, that the target at ``tau`` (set by ``option``) is the approximation."""
        if self.temperatures is None or self.tail == "renormalize" or self.cached_slot(tau) is not None:
            return
        near = self.temperatures[target_model.nearest_temperature(tau, self.temperatures)]
        warnings.warn(f"{option}={tau:g} is not a temperature the cache holds "
                      f"({', '.join(f'{t:g}' for t in self.temperatures)}): the teacher's target is approximate — "
                      f"the τ={near:g} target with a flat tail tempered by {near:g}/{tau:g} (top-k weights exact, "
                      f"tail mass off); rebuild the cache with --temperatures including {tau:g} for the exact target",
                      stacklevel=3)

    def _require_cache(self) -> None:
        if self.temperatures is None:
            raise ValueError("cached targets need the cache's temperatures (temperatures=...)")

    def log_probs(self, target, tau: float) -> torch.Tensor:
        """Dense (B, C) teacher log-probabilities at ``tau`` from a cached ``(logp, indices, tail)`` triple or
        from live full logits."""
        if isinstance(target, torch.Tensor):
            return target_model.online_log_probs(target, self.online_topk, tau, self.num_classes, self.tail)
        self._require_cache()
        logp, indices, tails = target
        s = self.cached_slot(tau)
        if s is not None or self.tail == "renormalize":   # renormalising ignores the tail: exact at every τ
            return target_model.target_log_probs(logp, indices, tails[:, s or 0], tau, self.num_classes, self.topk,
                                                 self.tail)
        return target_model.uncached_estimate(logp, indices, tails, self.temperatures, tau, self.num_classes,
                                              self.topk)

    def stacked(self, targets: Mapping, keys: list[tuple[str, float]]) -> torch.Tensor:
        """(U, B, C) log-probabilities of the (teacher, τ) ``keys``, built together (a τ that is not cached falls
        back to the per-target approximation, warned about before training)."""
        first = None if isinstance(targets, CachedTargets) else targets[keys[0][0]]   # a loader's stack: cached
        if isinstance(first, torch.Tensor):
            return self._stacked_online(targets, keys, first.device)
        self._require_cache()
        slots = [self.cached_slot(tau) for _, tau in keys]
        if self.tail != "renormalize" and any(s is None for s in slots):
            return torch.stack([self.log_probs(targets[name], tau) for name, tau in keys])
        logp, indices, tail = CachedTargets.of(targets).stacked([n for n, _ in keys], [s or 0 for s in slots])
        return target_model.target_log_probs(logp, indices, tail, self._key_tau(keys, logp.device), self.num_classes,
                                             self.topk, self.tail)

    def _stacked_online(self, targets: Mapping, keys: list, device) -> torch.Tensor:
        """From live full logits: one top-k + tail encoding, one scatter."""
        k = self.online_topk if 0 < self.online_topk < self.num_classes else self.num_classes
        taus = sorted({tau for _, tau in keys})
        logp, indices, tails = target_model.encode_logits(torch.stack([targets[name] for name, _ in keys]), k, taus)
        if len(taus) == 1:
            tail = tails[..., 0]
        else:
            tail = torch.stack([tails[u, :, taus.index(tau)] for u, (_, tau) in enumerate(keys)])
        return target_model.target_log_probs(logp, indices, tail, self._key_tau(keys, device), self.num_classes,
                                             k, self.tail)

    def _key_tau(self, keys: list, device):
        """The keys' τ: one float, or a (U, 1, 1) tensor copied to ``device`` once."""
        taus = tuple(tau for _, tau in keys)
        if len(set(taus)) == 1:
            return taus[0]
        held = self._taus.get((taus, device))
        if held is None:
            held = self._taus[(taus, device)] = torch.tensor(taus, device=device).view(-1, 1, 1)
        return held


def label_ce(logits: torch.Tensor, labels: torch.Tensor, mix: "MixInfo | None", smoothing: float) -> torch.Tensor:
    """Label-smoothed CE; with mixing, against λ·y + (1−λ)·y_partner, each smoothed (timm's mixup targets)."""
    if mix is None:
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    soft = mixed_targets(labels, mix.partner_labels, mix.lam, logits.shape[1], smoothing)
    return torch.sum(-soft * F.log_softmax(logits.float(), dim=1), dim=1).mean()


class CiTLoss(torch.nn.Module):
    """Eq. 1 over the student's per-head logits.

    ``terms`` maps teachers to heads: conv teacher -> ``conv`` head, inv teacher -> ``inv`` head for CiT, or every
    teacher -> ``cls`` head for the one-token variant.  ``temperatures`` and ``cache_topk``: the cache's (see
    ``TargetModel``).  ``forward`` returns the total loss and its detached parts (device tensors: the caller
    decides when to sync)."""

    def __init__(self, cfg: LossConfig, terms: list[KDTerm], num_classes: int,
                 temperatures: list[float] | tuple[float, ...] | None = None, cache_topk: int = 0):
        super().__init__()
        self.cfg, self.terms, self.num_classes = cfg, terms, num_classes
        self.model = TargetModel(cfg, num_classes, temperatures, cache_topk)
        self._on_device: dict = {}
        for term in terms:
            self.model.warn_if_not_cached(term.tau, f"loss.tau{1 if term.slot == 'conv' else 2}")

    @property
    def temperatures(self) -> list[float] | None:
        return self.model.temperatures

    def _constants(self, device: torch.device) -> tuple:
        """Per-term temperatures (T, 1, 1) and weights (T,) on ``device``, copied there once while the terms stay the
        same (a weight schedule scales them by ``forward``'s ``kd_scale`` instead)."""
        taus, weights = tuple(t.tau for t in self.terms), tuple(t.weight for t in self.terms)
        held = self._on_device.get(device)
        if held is None or held[0] != (taus, weights):
            tau = taus[0] if len(set(taus)) == 1 else torch.tensor(taus, device=device).view(-1, 1, 1)
            held = self._on_device[device] = ((taus, weights), (tau, torch.tensor(weights, device=device)))
        return held[1]

    def targets(self, targets: Mapping, mix: "MixInfo | None" = None) -> torch.Tensor:
        """(terms, B, C) teacher log-probabilities of every KD term, built for all teachers at once (one target
        build, one scatter) from the terms' distinct (teacher, τ) keys; ``approx`` mixing mixes them in the same
        pass."""
        keys = list(dict.fromkeys((t.teacher, t.tau) for t in self.terms))
        log_q = self.model.stacked(targets, keys)
        if mix is not None and mix.partner_index is not None:     # approx: temper, then mix
            log_q = mix_log_probs(log_q, mix.lam, mix.partner_index)
        if len(keys) == len(self.terms):
            return log_q
        return log_q[[keys.index((t.teacher, t.tau)) for t in self.terms]]

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, targets: dict | None = None,
                mix: "MixInfo | None" = None, kd_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``kd_scale``: a factor on every KD term's weight (a weight schedule's value at this step)."""
        ce = label_ce(outputs["cls"], labels, mix, self.cfg.label_smoothing)
        loss = self.cfg.lambda0 * ce
        parts = {"ce": ce.detach()}
        if self.terms:     # every KD term of the step in one pass: stacked targets, one log_softmax, one KL
            log_q = self.targets(targets or {}, mix)
            tau, weights = self._constants(log_q.device)
            students = torch.stack([outputs[term.head] for term in self.terms])
            kl = kd_kl_stacked(students, log_q, tau)
            kd = torch.dot(weights, kl)
            loss = loss + (kd if kd_scale == 1.0 else kd_scale * kd)
            detached = kl.detach()
            for i, term in enumerate(self.terms):
                parts[f"kd_{term.slot}"] = detached[i]
        parts["loss"] = loss.detach()
        return loss, parts
