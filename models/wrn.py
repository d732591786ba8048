"""Wide Residual Network of Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), in the
pre-activation form used by Outlier Exposure and energy_ood (WRN-40-2 is their CIFAR backbone)."""
import torch
import torch.nn.functional as F
from torch import nn

from models.normalize import Normalize


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == planes
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # As in the reference code, a projection shortcut sees the pre-activated input.
        return out + (x if self.equal_in_out else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10, drop_rate: float = 0.3,
                 normalize: Normalize | None = None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = normalize or Normalize()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBasicBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1,
                                     drop_rate) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
