"""Target sources: what a batch's student is fitted to — labels, how the batch was mixed, and each teacher's output.

Three interchangeable sources turn a ``Batch`` into ``Targets``: ``CachedSource`` (the cached top-k of the views
the batch replays; no teacher runs), ``OnlineSource`` (the teachers run live on the same views: the parity and
speed reference) and ``NoSource`` (labels only).  ``Targets.log_probs(teacher, τ)`` is the teacher's dense
distribution at τ under the one target model of ``shared.targets`` (exact at every cached τ, the documented
approximation at others), mixed like the batch in ``approx`` mode; ``Targets.top1(teacher)`` its top class;
``Targets.pooled(teacher)`` its pooled penultimate features (float32 (B, D): the cache's decoded uint8 codes, or
live from the same views — ``shared.features``; not defined for ``approx`` mixing, which mixes after the teachers
saw the views).  An objective reads only ``Targets``, so every recipe works with every source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.losses import MixInfo, TargetModel, mix_log_probs


@dataclass
class Targets:
    """One batch's targets.  ``teachers``: name -> cached ``(logp, indices, tail)`` or live logits (B, C);
    ``mix``: how the batch was mixed (``partner_index`` set when cached distributions must be mixed here)."""
    labels: torch.Tensor
    teachers: dict
    mix: MixInfo | None
    model: TargetModel | None
    features: dict = field(default_factory=dict)    # name -> float32 (B, D) pooled features (when asked for)
    _memo: dict = field(default_factory=dict, repr=False)

    def pooled(self, teacher: str) -> torch.Tensor:
        """(B, D) float32: ``teacher``'s pooled penultimate features of this batch's views."""
        return self.features[teacher]

    def log_probs(self, teacher: str, tau: float) -> torch.Tensor:
        """(B, C) log-probabilities of ``teacher`` at ``tau`` for this batch's (possibly mixed) views."""
        key = (teacher, tau)
        if key not in self._memo:
            log_q = self.model.log_probs(self.teachers[teacher], tau)
            if self.mix is not None and self.mix.partner_index is not None:     # approx: temper, then mix
                log_q = mix_log_probs(log_q, self.mix.lam, self.mix.partner_index)
            self._memo[key] = log_q
        return self._memo[key]

    def top1(self, teacher: str) -> torch.Tensor:
        """The teacher's top class per view: the cached first index (the top-k is sorted), the live argmax, or the
        argmax of the mixed distribution when cached views are mixed here."""
        target = self.teachers[teacher]
        if self.mix is not None and self.mix.partner_index is not None:
            return self.log_probs(teacher, 1.0).argmax(1)
        if isinstance(target, torch.Tensor):
            return target.argmax(1)
        return target[1][:, 0].long()


def _mix(batch, keep_partner: bool) -> MixInfo | None:
    if batch.partner_labels is None:
        return None
    return MixInfo(batch.partner_labels, batch.lam, batch.partner_index if keep_partner else None)


@dataclass
class CachedSource:
    """Each view's cached top-k; in ``approx`` mixing the distributions are mixed after tempering.
    ``feature_dims`` (the teachers' ``feature_dim``): their cached pooled features too (the join read them)."""
    teachers: tuple[str, ...]
    model: TargetModel
    feature_dims: tuple[int, ...] = ()

    def __call__(self, batch) -> Targets:
        features = batch.teacher_features(list(self.teachers), list(self.feature_dims)) if self.feature_dims else {}
        return Targets(batch.labels, batch.targets(list(self.teachers)), _mix(batch, True), self.model, features)


@dataclass
class OnlineSource:
    """Teachers run live on the batch's views (already mixed: they see the student's pixels); with ``features``
    their pooled features from the same pass (``OnlineTeachers.with_features``)."""
    teachers: torch.nn.Module          # views -> {name: logits}
    model: TargetModel
    features: bool = False

    def __call__(self, batch) -> Targets:
        if self.features:
            logits, features = self.teachers.with_features(batch.views)
            return Targets(batch.labels, logits, _mix(batch, False), self.model, features)
        return Targets(batch.labels, self.teachers(batch.views), _mix(batch, False), self.model)


@dataclass
class NoSource:
    """Labels only (a features term is refused before training: there is no teacher)."""
    model: TargetModel | None = None

    def __call__(self, batch) -> Targets:
        return Targets(batch.labels, {}, _mix(batch, False), self.model)
