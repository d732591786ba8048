"""ResNets for 32x32 images.

* ``CifarResNet``: ResNet-20/32/56 of He et al., "Deep Residual Learning for Image Recognition"
  (CVPR 2016, section 4.2): 3 stages of 16/32/64 channels, n basic blocks each (depth = 6n + 2),
  bias-free convolutions and option-A shortcuts (strided identity, zero-padded channels: no parameters).
* ``ResNet18``: the ImageNet ResNet-18 with the usual CIFAR stem (3x3 stride-1 first convolution, no max-pool)
  and 1x1 convolution shortcuts.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.normalize import Normalize


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels equally on both sides."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, option: str) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride, option)]
    layers += [BasicBlock(planes, planes, 1, option) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, normalize: Normalize | None = None):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = normalize or Normalize()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, n, 1, "A")
        self.layer2 = _make_stage(16, 32, n, 2, "A")
        self.layer3 = _make_stage(32, 64, n, 2, "A")
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, normalize: Normalize | None = None):
        super().__init__()
        self.normalize = normalize or Normalize()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _make_stage(64, 64, 2, 1, "B")
        self.layer2 = _make_stage(64, 128, 2, 2, "B")
        self.layer3 = _make_stage(128, 256, 2, 2, "B")
        self.layer4 = _make_stage(256, 512, 2, 2, "B")
        self.fc = nn.Linear(512, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
