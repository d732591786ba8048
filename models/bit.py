"""BiT-S ResNet-v2 (Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning", ECCV 2020), the
ImageNet-1K model of GradNorm (Huang et al., NeurIPS 2021) and MOS (Huang & Li, CVPR 2021).

Pre-activation bottlenecks (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016) with the stride on
the 3×3 convolution, GroupNorm(32) instead of BatchNorm, weight-standardised convolutions (``StdConv2d``), a root of
a 7×7 stride-2 convolution, zero padding by one and a 3×3 stride-2 max-pool without padding, and a 1×1-convolution
head on the pooled 1×1 map. Module names are those of GradNorm's and MOS's ``resnetv2.py`` (``root.conv``,
``body.block<N>.unit<MM>.{gn1, conv1, gn2, conv2, gn3, conv3, downsample}``, ``before_head.gn``, ``head.conv``), so
their released state dicts load as they are (``utils.released``, source ``bit``).

``block_units`` and ``width`` (the root's channels, 64 × the width factor) reduce the model for tests; ``groups``
is GroupNorm's number of groups.
"""
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.normalize import Normalize

STD_EPS = 1e-10  # resnetv2.py's: added to the variance before the square root


class StdConv2d(nn.Conv2d):
    """A convolution whose weight is standardised per output channel before use: ŵ = (w − mean(w)) / √(var(w) +
    ε), mean and (biased) variance over the fan-in. The parameter is the raw w; its gradient goes through the
    standardisation (``utils.norm_rules.std_conv2d_norms`` tracks that gradient)."""

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (self.weight - mean) / torch.sqrt(var + STD_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class PreActBottleneck(nn.Module):
    """GroupNorm-ReLU before each convolution (1×1, 3×3 with the stride, 1×1); the projection shortcut, where the
    shape changes, takes the first pre-activation."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1, groups: int = 32):
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, cin)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, 1, bias=False)
        self.gn3 = nn.GroupNorm(groups, cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        residual = self.downsample(out) if hasattr(self, "downsample") else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual


class ResNetV2(nn.Module):
    def __init__(self, block_units: Sequence[int], num_classes: int = 1000, normalize: Normalize | None = None,
                 width: int = 64, groups: int = 32):
        super().__init__()
        self.normalize = normalize or Normalize()
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, width, 7, 2, 3, bias=False)),
            ("pad", nn.ConstantPad2d(1, 0.0)),
            ("pool", nn.MaxPool2d(3, 2)),
        ]))
        blocks, cin = [], width
        for index, units in enumerate(block_units):
            cmid = width * 2 ** index
            cout, stride = 4 * cmid, 1 if index == 0 else 2
            unit_list = [(f"unit{u:02d}", PreActBottleneck(cin if u == 1 else cout, cout, cmid,
                                                           stride if u == 1 else 1, groups))
                         for u in range(1, units + 1)]
            blocks.append((f"block{index + 1}", nn.Sequential(OrderedDict(unit_list))))
            cin = cout
        self.body = nn.Sequential(OrderedDict(blocks))
        self.before_head = nn.Sequential(OrderedDict([
            ("gn", nn.GroupNorm(groups, cin)),
            ("relu", nn.ReLU(inplace=True)),
            ("avg", nn.AdaptiveAvgPool2d(1)),
        ]))
        self.head = nn.Sequential(OrderedDict([("conv", nn.Conv2d(cin, num_classes, 1, bias=True))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.before_head(self.body(self.root(self.normalize(x)))))
        return out[..., 0, 0]


BIT_R50_UNITS = (3, 4, 6, 3)
BIT_R101_UNITS = (3, 4, 23, 3)
