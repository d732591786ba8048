"""The optimizer and learning-rate schedules of both training scripts, stepped once per optimizer step."""
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def sgd(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9 on every parameter, as in Outlier Exposure and energy_ood."""
    return torch.optim.SGD(model.parameters(), lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, lr_min: float = 1e-6) -> LambdaLR:
    """energy_ood's per-step cosine annealing from the initial ``lr`` down to ``lr_min`` at ``total_steps``:
    ``lr_t = lr_min + (lr - lr_min) · ½ (1 + cos(π t / total_steps))`` (Loshchilov & Hutter, SGDR, ICLR 2017)."""
    lr = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        return (lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * step / total_steps))) / lr

    return LambdaLR(optimizer, factor)


def step_schedule(optimizer: torch.optim.Optimizer, milestones: Sequence[int], steps_per_epoch: int,
                  gamma: float = 0.1) -> LambdaLR:
    """The learning rate times ``gamma`` from each epoch in ``milestones`` (0-based: the first epoch that
    trains with the lower rate) on; stepped per optimizer step like ``cosine_schedule``."""
    return LambdaLR(optimizer, lambda step: gamma ** sum(step >= m * steps_per_epoch for m in milestones))
