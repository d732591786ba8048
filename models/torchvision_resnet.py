"""torchvision's ResNet-50 (He et al., CVPR 2016; ``torchvision.models.resnet50``), the ImageNet-1K model of OpenOOD
v1.5's leaderboard, with the input normalisation inside as every model here. The class is torchvision's own; only
``normalize`` is added in front, so its state dict is torchvision's keys plus ``normalize.mean``/``normalize.std``
and torchvision's published files load as they are (``utils.released``, source ``torchvision``)."""
from collections.abc import Sequence

import torch
from torchvision.models.resnet import Bottleneck, ResNet

from models.normalize import Normalize

RESNET50_LAYERS = (3, 4, 6, 3)  # what torchvision.models.resnet50 passes to ResNet


class NormalizedResNet(ResNet):
    """``torchvision.models.resnet50(num_classes=K)`` with ``normalize`` first; ``layers`` (bottlenecks per stage)
    reduces it for tests."""

    def __init__(self, num_classes: int = 1000, normalize: Normalize | None = None,
                 layers: Sequence[int] = RESNET50_LAYERS):
        super().__init__(Bottleneck, list(layers), num_classes=num_classes)
        self.normalize = normalize or Normalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))
