"""Model zoo: ``get_model(arch, num_classes)`` builds any architecture by name.

Every model takes images in [0, 1] and normalises them itself with the ``mean``/``std`` buffers of its
``normalize`` module, so the normalisation is saved with the weights.
"""
from collections.abc import Callable, Sequence

from torch import nn

from models.normalize import Normalize
from models.resnet import CifarResNet, ResNet18
from models.wrn import WideResNet

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda k, norm: CifarResNet(20, k, norm),
    "resnet32": lambda k, norm: CifarResNet(32, k, norm),
    "resnet56": lambda k, norm: CifarResNet(56, k, norm),
    "resnet18": lambda k, norm: ResNet18(k, norm),
    "wrn40_2": lambda k, norm, drop_rate=0.3: WideResNet(40, 2, k, drop_rate, norm),
}
ARCHS = tuple(_BUILDERS)


def get_model(arch: str, num_classes: int, mean: Sequence[float] = (0.0, 0.0, 0.0),
              std: Sequence[float] = (1.0, 1.0, 1.0), **kwargs) -> nn.Module:
    """Build ``arch`` (one of ``ARCHS``) for ``num_classes`` classes with input normalisation ``mean``/``std``.

    ``kwargs`` go to the architecture (``drop_rate`` for ``wrn40_2``, default 0.3).
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return _BUILDERS[arch](num_classes, Normalize(mean, std), **kwargs)


def tracked_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight tensors gradient tracking measures: every parameter that is neither a bias nor a
    BatchNorm parameter, in ``named_parameters()`` order."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters(recurse=False)}
    return {name: p for name, p in model.named_parameters()
            if not name.endswith("bias") and id(p) not in norm_params}
