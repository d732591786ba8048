"""torchvision's ResNet-50 (He et al., CVPR 2016; ``torchvision.models.resnet50``), the ImageNet-1K model of OpenOOD
v1.5's leaderboard, with the input normalisation inside as every model here. Its modules and its forward are
torchvision's own; only ``normalize`` is added in front, so its state dict is torchvision's keys plus
``normalize.mean``/``normalize.std`` and torchvision's published files load as they are (``utils.released``, source
``torchvision``). torchvision is imported when such a model is built, not when ``models`` is: it costs seconds at
start-up, and most runs build none."""
from collections.abc import Sequence

import torch
from torch import nn

from models.normalize import Normalize

RESNET50_LAYERS = (3, 4, 6, 3)  # what torchvision.models.resnet50 passes to ResNet


class NormalizedResNet(nn.Module):
    """``torchvision.models.resnet50(num_classes=K)`` with ``normalize`` first; ``layers`` (bottlenecks per stage)
    reduces it for tests."""

    def __init__(self, num_classes: int = 1000, normalize: Normalize | None = None,
                 layers: Sequence[int] = RESNET50_LAYERS):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        for name, module in ResNet(Bottleneck, list(layers), num_classes=num_classes).named_children():
            self.add_module(name, module)  # torchvision's modules, initialised by torchvision, under its names
        self.normalize = normalize or Normalize()
        self._resnet_forward = ResNet._forward_impl  # torchvision's forward, run on these modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._resnet_forward(self, self.normalize(x))
