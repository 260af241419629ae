"""The student run's config: ``[data] [augment] [student] [train] [kd] [loss] [objective]`` sections, one TOML file
(optionally ``extends`` another) plus ``section.key=value`` overrides."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from shared.augment import ViewSpec
from shared.config import ConfigError, check_fields, load_config, section, set_dotted
from trainer.data import DataConfig
from trainer.engine import TrainConfig
from trainer.losses import LossConfig

KD_MODES = ("cached", "online", "none")
RECIPES = ("cit", "kd", "hard")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class StudentConfig:
    """``[student]``: which student, and its options (passed to ``shared.models.create_model``).  ``arch``: a CiT
    (``cit_nano``...), ``resnet10_student`` / ``mixer_ti_student`` / ``vit_ti_student``, or ``student:<timm name>``."""
    arch: str = "cit_nano"
    token_mode: str = "align"            # CiT only — align | random: how the conv/inv tokens are made
    heads: tuple[str, ...] = ()          # () = derived from [kd] and [objective]: cls + one head per KD slot in use
    drop_path_rate: float = 0.0
    options: dict = field(default_factory=dict)    # any further create_model keyword


@dataclass
class KDConfig:
    """``[kd]``: distillation mode and which cached teacher feeds which token."""
    mode: str = "cached"                 # cached | online | none
    conv_teacher: str = ""               # teacher name in the cache -> conv token (λ1, τ1)
    inv_teacher: str = ""                # teacher name in the cache -> inv token (λ2, τ2)
    shared_token: bool = False           # one-token variant: every term on the class head
    checkpoints: dict = field(default_factory=dict)   # online mode: teacher name -> checkpoint path

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise ValueError(f"kd.mode must be one of {KD_MODES}, got {self.mode!r}")

    def slots(self) -> list[tuple[str, str]]:
        """(slot, teacher name) for the KD terms in use."""
        if self.mode == "none":
            return []
        return [(slot, name) for slot, name in (("conv", self.conv_teacher), ("inv", self.inv_teacher)) if name]


@dataclass
class ObjectiveConfig:
    """``[objective]``: the recipe the teachers' targets are used in, and how its distillation weights move.

    ``cit``: Eq. 1 with ``[loss]``'s λ and τ.  ``kd``: one-head KD ``(1 − α)·CE + α·τ²·KL(q̄ ‖ σ(z_cls/τ))``, q̄ the
    mapped teachers' distributions averaged.  ``hard``: DeiT hard distillation, each distillation head fitted by CE
    to its teacher's top-1 class (weights λ1, λ2).  ``schedule`` scales the distillation weights (λ1, λ2 or α)
    from their value at the first step to ``final`` times it at the last: constant, linear or cosine decay.

    ``feature_weight`` / ``relation_weight`` add, to any recipe, per mapped teacher: feature KD (MSE between a
    learned linear projection of the student's pooled features and the teacher's pooled features) and relation KD
    (MSE between the batch's cosine-similarity matrices of the two); constant weights, 0 = off.  Cached mode needs a
    cache built with ``--features pooled``."""
    recipe: str = "cit"
    alpha: float = 0.5                   # kd: weight of the KD term; CE gets 1 − α
    tau: float = 1.0                     # kd: temperature
    schedule: str = "constant"
    final: float = 0.0                   # linear / cosine: the weights' fraction of their start value at the end
    feature_weight: float = 0.0          # feature KD: β · MSE(P·s, f) per mapped teacher
    relation_weight: float = 0.0         # relation KD: γ · MSE(cos(s, s'), cos(f, f')) per mapped teacher

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"objective.recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"objective.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"objective.alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"objective.tau must be positive, got {self.tau}")
        if self.final < 0:
            raise ValueError(f"objective.final must be >= 0, got {self.final}")
        for name in ("feature_weight", "relation_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def uses_features(self) -> bool:
        """Whether the objective needs the teachers' pooled features."""
        return self.feature_weight > 0 or self.relation_weight > 0


@dataclass
class RunConfig:
    data: DataConfig
    augment: ViewSpec
    student: StudentConfig
    train: TrainConfig
    kd: KDConfig
    loss: LossConfig
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "augment": self.augment.to_dict(), "student": asdict(self.student),
                "train": asdict(self.train), "kd": asdict(self.kd), "loss": asdict(self.loss),
                "objective": asdict(self.objective)}


SECTIONS = {"data": DataConfig, "student": StudentConfig, "train": TrainConfig, "kd": KDConfig, "loss": LossConfig,
            "objective": ObjectiveConfig}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A TOML config; a top-level ``extends = "base.toml"`` (relative to the file) is loaded first and
    overlaid, so ablation configs state only what they change."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"config {path} extends itself (via {' -> '.join(_seen)})")
    cfg = load_config(path)
    base = cfg.pop("extends", None)
    if base is None:
        return cfg
    return _merge(read_config_file(os.path.join(os.path.dirname(path), base), _seen + (path,)), cfg)


def load_run_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A TOML file (sections [data] [augment] [student] [train] [kd] [loss] [objective]) plus ``section.key=value``
    overrides."""
    cfg = read_config_file(path) if path else {}
    for item in overrides:
        set_dotted(cfg, item)
    unknown = sorted(set(cfg) - set(SECTIONS) - {"augment"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(SECTIONS) + ['augment']}")
    try:
        augment = ViewSpec.from_dict(check_fields(cfg.get("augment", {}), "augment", ViewSpec))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[augment]: {exc}") from None
    return RunConfig(augment=augment, **{name: section(cfg, name, cls) for name, cls in SECTIONS.items()})
