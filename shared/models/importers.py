"""Published weights -> a project checkpoint: timm models, torchvision ResNets, the official RedNets.

A weights file is read without executing pickle (safetensors, or ``torch.load(weights_only=True)``), unwrapped
(``state_dict`` / ``model`` / ``module`` entries, ``module.`` prefixes), renamed by a table of regular expressions
(`NAME_MAPS`) and checked tensor for tensor against the model ``create_model`` builds: a missing, unexpected or
misshapen tensor is an error that names the first offenders. Input size, interpolation and normalisation come
from timm's pretrained config of the architecture (`pretrained_input`; it is part of the model definition, so no
download happens) unless the caller gives them.

The official RedNets (mmcls, the involution authors' code) differ from `shared.models.rednet` only in names:
mmcls wraps each conv + BN in a ``ConvModule`` (``.conv`` / ``.bn``), calls the stages ``layer1..4`` and the
involution's kernel-generation convs ``conv1`` (reduce + BN) and ``conv2`` (span); tensors, order and shapes
are the same (251 / 351 / 451 / 876 for RedNet-26/38/50/101). Co-advise keeps the same backbone as ``model.*``
and the classifier as ``classifier.*``. torchvision ResNets use timm's ResNet names unchanged.

``small_input`` changes a stem (stride, kernel, max-pool), so stock weights would run in a different network:
that is refused unless ``allow_stem_change``, and then every change of the stem is named and recorded.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from shared.checkpoint import CheckpointError, ModelMeta, file_sha256
from .normalize import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

__all__ = ["ImportSpec", "WeightsImportError", "InputConfig", "NAME_MAPS", "SOURCES", "TORCHVISION_RESNETS",
           "import_weights", "read_state_dict", "unwrap_state_dict", "rename", "pretrained_input",
           "stem_changes", "fit_report"]

# --- name tables --------------------------------------------------------------------------------------------

# Each rule is (regex, replacement), applied in order with re.sub (count=1) to every source name.
_REDNET_INVOLUTION = r"(stem\.1|stages\.\d+\.\d+\.conv2)"   # where an involution sits in shared.models.rednet
MMCLS_REDNET: tuple[tuple[str, str], ...] = (
    (r"^backbone\.", ""),
    (r"^head\.fc\.", "fc."),
    (r"^layer1\.", "stages.0."), (r"^layer2\.", "stages.1."), (r"^layer3\.", "stages.2."), (r"^layer4\.", "stages.3."),
    # stem: ConvModule(conv, bn) at 0 and 4 -> Sequential(conv, bn, relu); 1 = involution 3x3; 2 = BN
    (r"^stem\.(0|4)\.conv\.", r"stem.\1.0."),
    (r"^stem\.(0|4)\.bn\.", r"stem.\1.1."),
    # involution: conv1 = ConvModule(1x1 reduce, bn), conv2 = ConvModule(1x1 span with bias)
    (rf"^{_REDNET_INVOLUTION}\.conv1\.conv\.", r"\1.reduce."),
    (rf"^{_REDNET_INVOLUTION}\.conv1\.bn\.", r"\1.bn."),
    (rf"^{_REDNET_INVOLUTION}\.conv2\.conv\.", r"\1.span."),
)
COADVISE_REDNET: tuple[tuple[str, str], ...] = ((r"^model\.", "backbone."), (r"^classifier\.", "head.fc."),
                                                *MMCLS_REDNET)
NAME_MAPS: dict[str, tuple[tuple[str, str], ...]] = {
    "timm": (),              # the timm model's own names
    "torchvision": (),       # torchvision ResNet names are timm's ResNet names
    "mmcls": MMCLS_REDNET,   # official RedNet checkpoints: backbone.*, head.fc.*
    "coadvise": COADVISE_REDNET,   # co-advise teachers: model.*, classifier.*
}
SOURCES = ("auto", *NAME_MAPS)

# Wrappers a training script leaves around a state dict: dict entries and name prefixes (DataParallel/DDP, compile).
WRAPPER_KEYS = ("state_dict", "model", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers some checkpoints lack and that do not affect inference (older PyTorch BatchNorm): filled with zeros.
OPTIONAL_BUFFERS = ("num_batches_tracked",)

# torchvision ResNets timm has under the same names; their preprocessing is timm's `.tv_in1k` config.
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                       "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")

# The official RedNets' evaluation pipeline (mmcls ImageNet config): 224 px, bilinear, ImageNet mean/std,
# first conv and classifier named as timm's pretrained configs name them.
REDNET_PRETRAINED = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                     "std": IMAGENET_STD, "first_conv": "stem.0.0", "classifier": "fc", "num_classes": 1000}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class WeightsImportError(CheckpointError):
    """Weights that cannot be imported as asked; the message names the file and the first offending tensors."""


@dataclass
class InputConfig:
    """How a teacher wants its input: side length, resize interpolation, normalisation; ``origin`` says whence."""
    input_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str


@dataclass
class ImportSpec:
    """What to import. ``arch``: a timm name (optionally ``name.tag``) or a registered RedNet; ``source``: the
    naming of ``weights`` (``auto`` detects it). Input fields left None come from the pretrained config."""
    arch: str
    weights: str
    source: str = "auto"
    kind: str | None = None
    num_classes: int | None = None
    key: str | None = None                  # the entry of a wrapped checkpoint to use (default: WRAPPER_KEYS)
    input_size: int | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    small_input: bool = False
    allow_stem_change: bool = False
    options: dict[str, Any] = field(default_factory=dict)   # further create_model keywords

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise WeightsImportError(f"--from must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise WeightsImportError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                                     f"{self.interpolation!r}")
        if (self.mean is None) != (self.std is None):
            raise WeightsImportError("give both --mean and --std, or neither")


# --- reading ------------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> Any:
    """The object stored in ``path``: safetensors directly, anything else through ``torch.load(weights_only=True)``,
    which refuses pickled objects other than tensors and plain containers (no code from the file ever runs)."""
    if not os.path.isfile(path):
        raise WeightsImportError(f"weights file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsImportError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsImportError(f"{path}: refused to load: it pickles objects other than tensors ({first[:160]}); "
                                 f"loading it would run code from the file. Save its state_dict (tensors only) or "
                                 f"convert it to safetensors where you trust it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        kind = "a zip/pickle checkpoint" if head[:2] == b"PK" or head[:1] == b"\x80" else "a torch file"
        raise WeightsImportError(f"{path}: cannot read it as {kind}: {str(exc).splitlines()[0][:200]}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, path: str, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint and where they were found (``"state_dict"``, ``"model/module."``, ...)."""
    where: list[str] = []
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsImportError(f"{path}: has no entry {key!r} (--key); it has {have}")
        obj, where = obj[key], [key]
    for _ in range(3):      # e.g. {"model": {"state_dict": ...}}
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
        where.append(inner)
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsImportError(f"{path}: holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        entries = ", ".join(repr(k) for k in list(obj)[:8])
        raise WeightsImportError(f"{path}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor (entries: "
                                 f"{entries}); name the entry holding the weights with --key")
    tensors = {str(k): v for k, v in obj.items()}
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            where.append(prefix)
    return tensors, "/".join(where)


def rename(names: list[str], source: str) -> dict[str, str]:
    """Source name -> model name by the rules of ``NAME_MAPS[source]`` (each rule applied once, in order)."""
    rules = [(re.compile(pattern), repl) for pattern, repl in NAME_MAPS[source]]
    out = {}
    for name in names:
        new = name
        for pattern, repl in rules:
            new = pattern.sub(repl, new, count=1)
        out[name] = new
    return out


def detect_source(names: list[str]) -> str:
    """The naming of a state dict: mmcls (``backbone.``), co-advise (``model.`` + ``classifier.``) or timm's."""
    if any(n.startswith("backbone.") for n in names):
        return "mmcls"
    if any(n.startswith("model.") for n in names) and any(n.startswith("classifier.") for n in names):
        return "coadvise"
    return "timm"


# --- the model and its input --------------------------------------------------------------------------------

def _is_rednet(arch: str) -> bool:
    return re.fullmatch(r"rednet(26|38|50|101)", arch) is not None


def _timm_arch(spec: ImportSpec, source: str) -> str:
    """The timm name to build: torchvision ResNets get their ``.tv_in1k`` (or ``.tv2_in1k``) preprocessing."""
    import timm
    arch = spec.arch[5:] if spec.arch.startswith("timm:") else spec.arch
    if source == "torchvision":
        base, _, tag = arch.partition(".")
        if base not in TORCHVISION_RESNETS:
            raise WeightsImportError(f"--from torchvision supports the ResNets {', '.join(TORCHVISION_RESNETS)}; got "
                                     f"{base!r} (other torchvision models use other names: import them from timm)")
        if not tag:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.tv*")]
            tag = "tv_in1k" if "tv_in1k" in tags else (tags[0] if tags else "")
        arch = f"{base}.{tag}" if tag else base
    if not timm.is_model(arch):
        raise WeightsImportError(f"{spec.arch!r} is neither rednet26/38/50/101 nor a timm model name (see "
                                 f"timm.list_models(); a pretrained tag such as regnety_032.ra_in1k is allowed)")
    return arch


def pretrained_input(arch: str) -> dict[str, Any]:
    """timm's pretrained config of ``arch`` (or the official RedNet pipeline): input size, interpolation,
    mean/std, first conv and classifier names. Read from the model definition; nothing is downloaded."""
    if _is_rednet(arch):
        return dict(REDNET_PRETRAINED)
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError as exc:   # an unknown pretrained tag
        raise WeightsImportError(f"{arch}: {exc}") from None
    if cfg is None:
        return {}
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return {k: data.get(k) for k in ("input_size", "interpolation", "mean", "std", "first_conv", "classifier",
                                     "num_classes", "tag")}


def resolve_input(spec: ImportSpec, cfg: Mapping[str, Any], arch: str, in_chans: int) -> InputConfig:
    """Command-line values first, then the pretrained config; a value neither gives is an error naming it."""
    given = [n for n in ("input_size", "interpolation", "mean") if getattr(spec, n) is not None]
    size = spec.input_size
    if size is None and cfg.get("input_size"):
        h, w = cfg["input_size"][-2:]
        if h != w:
            raise WeightsImportError(f"{arch}: pretrained input size is {h}x{w}; views are square: give --input-size")
        size = int(h)
    interpolation = spec.interpolation or cfg.get("interpolation")
    mean, std = (spec.mean, spec.std) if spec.mean is not None else (cfg.get("mean"), cfg.get("std"))
    missing = [n for n, v in (("--input-size", size), ("--interpolation", interpolation), ("--mean/--std", mean))
               if v is None]
    if missing:
        raise WeightsImportError(f"{arch}: no pretrained config gives {', '.join(missing)}; pass them")
    if interpolation not in INTERPOLATIONS:
        raise WeightsImportError(f"{arch}: pretrained interpolation {interpolation!r} is not one of "
                                 f"{', '.join(INTERPOLATIONS)}; pass --interpolation")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != in_chans and len(mean) == 3 and in_chans == 1:   # grey weights: the channel average
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if _is_rednet(arch):
        base = "the official RedNet evaluation pipeline (mmcls ImageNet config)"
    else:
        base = f"timm pretrained config {arch}" + (f".{cfg['tag']}" if cfg.get("tag") and "." not in arch else "")
    origin = "command line" if len(given) == 3 else base + (f" (overridden: {', '.join(given)})" if given else "")
    return InputConfig(int(size), str(interpolation), mean, std, origin)


def _infer(tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any],
           spec: ImportSpec) -> tuple[int | None, int | None]:
    """(num_classes, in_chans) from the classifier and first-conv tensors the pretrained config names."""
    classes = spec.num_classes
    fc = tensors.get(f"{cfg.get('classifier')}.weight") if cfg.get("classifier") else None
    if classes is None and fc is not None and fc.dim() >= 2:
        classes = int(fc.shape[0])
    if classes is None:    # no classifier where the config says: build the stock head, the fit check names the rest
        classes = cfg.get("num_classes")
    conv = tensors.get(f"{cfg.get('first_conv')}.weight") if cfg.get("first_conv") else None
    chans = int(conv.shape[1]) if conv is not None and conv.dim() == 4 else None
    return classes, chans


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"conv {module.kernel_size[0]}x{module.kernel_size[1]} stride {module.stride[0]}"
    return type(module).__name__


def stem_changes(stock: nn.Module, adapted: nn.Module) -> dict[str, str]:
    """Module name -> "before -> after" for every module ``small_input`` changed (type, kernel or stride)."""
    changed = {}
    adapted_modules = dict(adapted.named_modules())
    for name, module in stock.named_modules():
        other = adapted_modules.get(name)
        if other is None or not name:
            continue
        before, after = _describe(module), _describe(other)
        if before != after:
            changed[name] = f"{before} -> {after}"
    return changed


@dataclass
class FitReport:
    """How a renamed state dict fits a model: what is missing, unexpected or of the wrong shape."""
    missing: list[str]
    unexpected: list[tuple[str, str]]          # (source name, model name)
    shapes: list[tuple[str, str, tuple, tuple]]   # (source name, model name, source shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)

    def line(self, limit: int = 3) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing[:limit])}"
                         f"{', …' if len(self.missing) > limit else ''})")
        if self.unexpected:
            shown = ", ".join(src if src == dst else f"{src} (as {dst})" for src, dst in self.unexpected[:limit])
            more = ", …" if len(self.unexpected) > limit else ""
            parts.append(f"{len(self.unexpected)} unexpected ({shown}{more})")
        if self.shapes:
            shown = ", ".join(f"{dst} {tuple(a)} vs model {tuple(b)}" for _, dst, a, b in self.shapes[:limit])
            parts.append(f"{len(self.shapes)} of another shape ({shown}{', …' if len(self.shapes) > limit else ''})")
        return "; ".join(parts)


def fit_report(renamed: Mapping[str, tuple[str, torch.Tensor]], target: Mapping[str, torch.Tensor]) -> FitReport:
    """``renamed``: model name -> (source name, tensor). Missing optional buffers are not reported."""
    missing = [k for k in target if k not in renamed and k.rsplit(".", 1)[-1] not in OPTIONAL_BUFFERS]
    unexpected = [(src, dst) for dst, (src, _) in renamed.items() if dst not in target]
    shapes = [(src, dst, tuple(t.shape), tuple(target[dst].shape)) for dst, (src, t) in renamed.items()
              if dst in target and tuple(t.shape) != tuple(target[dst].shape)]
    return FitReport(missing, unexpected, shapes)


def _in_modules(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


# --- the import ---------------------------------------------------------------------------------------------

def _renamed(tensors: Mapping[str, torch.Tensor], source: str, path: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Model name -> (source name, tensor); two source names mapping to one model name is an error."""
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    for src, dst in rename(list(tensors), source).items():
        if dst in renamed:
            raise WeightsImportError(f"{path}: {renamed[dst][0]!r} and {src!r} both map to {dst!r} ({source} names)")
        renamed[dst] = (src, tensors[src])
    return renamed


def _stem_guard(spec: ImportSpec, arch: str, kwargs: dict, model: nn.Module, path: str) -> dict[str, str]:
    """The stem changes of a small-input model (vs the stock one); refused unless ``allow_stem_change``."""
    from shared.models import create_model
    if not spec.small_input:
        return {}
    changes = stem_changes(create_model(arch, **{**kwargs, "small_input": False}), model)
    if changes and not spec.allow_stem_change:
        described = "; ".join(f"{k}: {v}" for k, v in changes.items())
        raise WeightsImportError(f"{path}: --small-input changes the stem of {arch} ({described}) that these "
                                 f"weights were trained with; pass --allow-stem-change to import them anyway")
    return changes


def _load_exactly(model: nn.Module, renamed: dict[str, tuple[str, torch.Tensor]], changes: Mapping[str, str],
                  what: str) -> list[str]:
    """Load every tensor or raise naming the misfits; returns the changed-stem tensors left at initialisation."""
    target = model.state_dict()
    report = fit_report(renamed, target)
    stem_left = [dst for _, dst, _, _ in report.shapes if _in_modules(dst, changes)]
    report.shapes = [s for s in report.shapes if s[1] not in stem_left]
    if not report.ok:
        raise WeightsImportError(f"{what}: {report.line()}")
    state = {dst: t.to(target[dst].dtype) for dst, (_, t) in renamed.items() if dst not in stem_left}
    for name in target:
        if name not in state:   # optional buffers and, with allow_stem_change, re-shaped stem tensors
            state[name] = target[name]
    model.load_state_dict(state, strict=True)
    return stem_left


def import_weights(spec: ImportSpec) -> tuple[nn.Module, ModelMeta]:
    """Build ``spec.arch``, load ``spec.weights`` into it exactly, and describe it (input config, source sha256).

    Raises `WeightsImportError` (a `CheckpointError`) naming the file and the first offending tensors."""
    from shared.models import create_model, model_kind

    path = os.fspath(spec.weights)
    tensors, where = unwrap_state_dict(read_state_dict(path), path, spec.key)
    source = detect_source(list(tensors)) if spec.source == "auto" else spec.source
    if source in ("mmcls", "coadvise") and not _is_rednet(spec.arch):
        raise WeightsImportError(f"{path}: {source} names are RedNet names; --arch must be rednet26/38/50/101, "
                                 f"got {spec.arch!r}")
    arch = spec.arch if _is_rednet(spec.arch) else _timm_arch(spec, source)
    renamed = _renamed(tensors, source, path)
    cfg = pretrained_input(arch)
    classes, chans = _infer({k: t for k, (_, t) in renamed.items()}, cfg, spec)
    if classes is None:
        raise WeightsImportError(f"{path}: cannot tell the number of classes (no {cfg.get('classifier')}.weight "
                                 f"after renaming): pass --num-classes")
    chans = chans or 3
    inp = resolve_input(spec, cfg, arch, chans)
    kwargs: dict[str, Any] = {**spec.options, "num_classes": classes, "in_chans": chans, "img_size": inp.input_size}
    if spec.small_input:
        kwargs["small_input"] = True
    try:
        model = create_model(arch, **kwargs)
    except (TypeError, ValueError) as exc:
        raise WeightsImportError(f"cannot build {arch!r} with {kwargs}: {exc}") from None
    changes = _stem_guard(spec, arch, kwargs, model, path)
    found = f" ({source} names{', found under ' + where if where else ''})"
    stem_left = _load_exactly(model, renamed, changes, f"{path}: weights do not fit {arch}{found}")
    if changes:
        left = f"; not loaded (shape differs, left at initialisation): {', '.join(stem_left)}" if stem_left else ""
        log.warning("%s: stem changed by --small-input (%s)%s", arch,
                    "; ".join(f"{k}: {v}" for k, v in changes.items()), left)
    model_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_chans")}
    origin = {"path": os.path.abspath(path), "sha256": file_sha256(path), "names": source, "entry": where or None,
              "tensors": len(tensors), "input_config": inp.origin}
    stem = {"stem_changed": changes, "stem_not_loaded": stem_left} if changes else {}
    meta = ModelMeta(arch=arch, num_classes=classes, in_chans=chans, kind=spec.kind or model_kind(arch),
                     img_size=inp.input_size, interpolation=inp.interpolation, model_kwargs=model_kwargs,
                     mean=list(inp.mean), std=list(inp.std), extra={"imported_from": origin, **stem})
    return model.eval(), meta
