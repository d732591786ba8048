"""Model zoo: ``get_model(arch, num_classes)`` builds any architecture by name.

Every model takes images in [0, 1] and normalises them itself with the ``mean``/``std`` buffers of its
``normalize`` module, so the normalisation is saved with the weights.
"""
from collections.abc import Callable, Sequence

from torch import nn

from models.bit import BIT_R50_UNITS, BIT_R101_UNITS, ResNetV2
from models.normalize import Normalize
from models.resnet import CifarResNet, ResNet18
from models.torchvision_resnet import NormalizedResNet
from models.wrn import WideResNet

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda k, norm: CifarResNet(20, k, norm),
    "resnet32": lambda k, norm: CifarResNet(32, k, norm),
    "resnet56": lambda k, norm: CifarResNet(56, k, norm),
    "resnet18": lambda k, norm: ResNet18(k, norm),
    "wrn40_2": lambda k, norm, drop_rate=0.3: WideResNet(40, 2, k, drop_rate, norm),
    "resnet50": lambda k, norm, **kw: NormalizedResNet(k, norm, **kw),
    "bit_r50x1": lambda k, norm, **kw: ResNetV2(kw.pop("block_units", BIT_R50_UNITS), k, norm, **kw),
    "bit_r101x1": lambda k, norm, **kw: ResNetV2(kw.pop("block_units", BIT_R101_UNITS), k, norm, **kw),
}
ARCHS = tuple(_BUILDERS)


def get_model(arch: str, num_classes: int, mean: Sequence[float] = (0.0, 0.0, 0.0),
              std: Sequence[float] = (1.0, 1.0, 1.0), **kwargs) -> nn.Module:
    """Build ``arch`` (one of ``ARCHS``) for ``num_classes`` classes with input normalisation ``mean``/``std``.

    ``kwargs`` go to the architecture: ``drop_rate`` for ``wrn40_2`` (default 0.3); ``layers`` (bottlenecks per
    stage) for ``resnet50``; ``block_units``, ``width`` and ``groups`` for the BiT models (``models.bit``), which
    reduce them for tests.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return _BUILDERS[arch](num_classes, Normalize(mean, std), **kwargs)


def tracked_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight tensors gradient tracking measures: every parameter that is neither a bias nor a
    BatchNorm or GroupNorm parameter, in ``named_parameters()`` order. A normalisation layer's affine weight
    scales each channel; like BatchNorm's (which the project never tracked), GroupNorm's is left out, so the
    tracked layers of every model are its convolutions and its classifier."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
                   for p in m.parameters(recurse=False)}
    return {name: p for name, p in model.named_parameters()
            if not name.endswith("bias") and id(p) not in norm_params}
