"""Convolutional teachers: any timm CNN, optionally with a stem that keeps 28-32 px images at full size.

ImageNet CNNs downsample 4x before the first stage (stride-2 stem + stride-2 max-pool, or a stride-2
conv stem); a 28 px image would reach the last stage at 1x1. ``small_input=True`` removes that early
downsampling (the usual CIFAR adaptation), which is what a teacher for Fashion-MNIST/CIFAR needs.
"""
from __future__ import annotations

import timm
import torch.nn as nn

__all__ = ["create_conv_teacher", "adapt_small_input", "SMALL_INPUT_FAMILIES"]

SMALL_INPUT_FAMILIES = ("resnet/resnext/seresnet (timm ResNet)", "regnet (timm RegNet)",
                        "efficientnet/mobilenet (timm EfficientNet/MobileNetV3)")


def _first_conv(module: nn.Module) -> nn.Conv2d:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"no Conv2d in {type(module).__name__}")


def _unstride(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def adapt_small_input(model: nn.Module, name: str) -> nn.Module:
    """Make ``model``'s stem stride 1 and drop its early max-pool, in place.

    ResNets: conv1 becomes a 3x3 stride-1 conv (deep stems keep their convs, first one unstrided) and
    the max-pool an Identity. RegNets and EfficientNet/MobileNet: the stem conv gets stride 1.
    Raises ValueError for architectures without a known stem layout.
    """
    cls = type(model).__name__
    if cls == "ResNet":
        if isinstance(model.conv1, nn.Conv2d):
            old = model.conv1
            model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        else:  # deep stem (resnet*d): a Sequential of 3x3 convs
            _unstride(_first_conv(model.conv1))
        model.maxpool = nn.Identity()
    elif cls == "RegNet":
        _unstride(_first_conv(model.stem))
    elif cls in ("EfficientNet", "MobileNetV3"):
        _unstride(_first_conv(model.conv_stem))
    else:
        raise ValueError(
            f"small_input=True is not supported for {name!r} (timm class {cls}); supported families: "
            f"{', '.join(SMALL_INPUT_FAMILIES)}. Use small_input=False or add a rule in shared/models/conv.py"
        )
    return model


def create_conv_teacher(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    img_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build timm model ``name`` from scratch (never downloads weights).

    Published weights come in through ``shared.models.importers`` (``cit teacher import``), which reads the input
    size, interpolation and normalisation from the model's ``pretrained_cfg`` (part of timm's model definition,
    also without a download) and refuses stock weights in a ``small_input`` stem unless told otherwise.

    ``img_size`` is accepted for a uniform builder signature and ignored: CNNs are size-agnostic.
    Extra ``kwargs`` (e.g. ``drop_rate``, ``drop_path_rate``) go to ``timm.create_model``.
    """
    if not timm.is_model(name):
        raise ValueError(f"{name!r} is not a timm model name (see timm.list_models())")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if small_input:
        adapt_small_input(model, name)
    return model
