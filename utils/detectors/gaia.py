"""GAIA-A and GAIA-Z: gradients at BatchNorm outputs (attribution abnormality), from the same batched pass."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import CifarResNet, ResNet18
from models.torchvision_resnet import NormalizedResNet
from models.wrn import WideResNet
from utils.activation_rules import FEATURES
from utils.detectors.base import (
    ActivationDetector,
    Scores,
)
from utils.per_sample import head_module

# GAIA (Chen et al., NeurIPS 2023): gradients at BatchNorm outputs rather than weights. Official code:
# JGEthanChen/GAIA-OOD, cal_method.py (cal_grad_value, cal_zero) and hook.py (get_beforehead_hooks, get_bn_hooks).
GAIA_PAPER = ("Chen, Li, Qu, Wang, Wan & Xiao, GAIA: Delving into Gradient-based Attribution Abnormality for "
              "Out-of-distribution Detection, NeurIPS 2023")


def batchnorms(module: nn.Module, prefix: str = "") -> tuple[str, ...]:
    """The BatchNorm2d modules of ``module`` by name, in ``modules()`` order (the order of the official hooks)."""
    return tuple(f"{prefix}{name}" for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d))


IN_PLACE = ("GAIA differentiates to BatchNorm outputs, which torchvision's ResNet overwrites in place (its ReLU and "
            "residual sum), so the gradient there is not the BatchNorm output's")


def gaia_a_targets(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """GAIA-A's hooked BatchNorm outputs and its pre-head target: the official ``get_beforehead_hooks`` choice,
    mapped onto our architectures.

    * ResNets (official ``resnet18/34/50``: every BatchNorm of ``layer3`` and ``layer4``, then ``layer4``'s output,
      the feature map the head pools): every BatchNorm of the **last two stages** and the last stage's output.
      ResNet-18 is the official network (``layer3``, ``layer4``, shortcut BatchNorms included); ResNet-20/32/56
      have three stages, so ``layer2`` and ``layer3`` (option-A shortcuts: no BatchNorm there).
    * Not torchvision's ResNet-50 (ImageNet): its in-place ReLU and residual sum overwrite the BatchNorm outputs
      that GAIA differentiates to, so the engine's gradient there would not be the BatchNorm output's.
    * WRN-40-2 (official ``wrn_40_2``: every BatchNorm, then the ``AdaptiveAvgPool2d`` output): every BatchNorm
      and ``FEATURES``, the head's input, which is that pool's output flattened (ours pools functionally).
    """
    if isinstance(model, WideResNet):
        return batchnorms(model), FEATURES
    if isinstance(model, NormalizedResNet):
        raise ValueError(IN_PLACE)
    if isinstance(model, (CifarResNet, ResNet18)):
        stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
        return sum((batchnorms(getattr(model, stage), f"{stage}.") for stage in stages[-2:]), ()), stages[-1]
    raise ValueError(f"GAIA's layer choice is defined for the ResNets and WRN-40-2, not {type(model).__name__}")


def _spatial_mean(grad: torch.Tensor) -> torch.Tensor:
    """The official ``grad.mean(dim=(-1, -2))`` of a (B, C, H, W) gradient; a (B, C) one is already pooled."""
    return grad.mean((-1, -2)) if grad.dim() == 4 else grad


def _keep_gradients(model: nn.Module, names: Sequence[str], grads: dict[str, torch.Tensor]) -> list:
    """hook.py's ``Grad_all_hook`` on each module of ``names``: a tensor hook on its output stores the gradient
    there, overwritten by each backward pass. Returns the handles."""
    modules = dict(model.named_modules())

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))
        return hook

    return [modules[name].register_forward_hook(keep(name)) for name in names]


class GaiaA(ActivationDetector):
    """GAIA-A (``cal_grad_value``, ``before_head`` hooks; ``gaia_a_targets`` says which per architecture): two
    backward passes. First L₁ = Σ_k log softmax(f(x))_k, dL₁/dz = 1 − K·softmax(z), and the output component
    o = sqrt(mean_c |spatial mean of dL₁/dF_c|) at the pre-head target F. Then L₂ = Σ_c h_c, the sum of the
    pooled features h (the head's input), and for each channel c of each hooked BatchNorm output a the inner
    component |spatial mean of dL₂/da_c|. Score: the mean over every hooked channel of (inner / o)², as
    ``cal_grad_value`` returns it; the official code ranks by its negation, so ID has the smaller value (sign −1).
    Rows: per BatchNorm, the same mean over its channels (``total`` is their channel-weighted mean).
    The engine back-propagates L₁ and L₂ as two rows of one batched pass (L₂ seeded at the features), so the
    second backward costs one more row (measured in docs/detectors_second_generation.md)."""
    name = "gaia_a"
    paper = GAIA_PAPER
    formula = "mean_c (|avg ∂Σh/∂a_c| / o)², o = sqrt(mean_c |avg ∂Σ_k log softmax_k/∂F_c|)"
    rows = "gaia_a"

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.stack([1 - logits.shape[1] * logits.softmax(1), torch.zeros_like(logits)])

    def feature_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        ones = logits.new_ones(len(logits), 1)
        return torch.stack([torch.zeros_like(ones), ones])

    def activations(self, model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
        inner, head = gaia_a_targets(model)
        return ("mean", (head,)), ("mean", inner)

    def reduce(self, results: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        (head,), inner = results[0].values(), results[1]
        output = head[0].abs().mean(1).sqrt().unsqueeze(1)  # (B, 1)
        parts = {name: (grad[1].abs() / output).pow(2) for name, grad in inner.items()}  # (B, C) each
        return Scores({name: part.mean(1) for name, part in parts.items()}, torch.cat(list(parts.values()), 1).mean(1),
                      torch.full((len(logits),), -1, device=logits.device))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        inner, head = gaia_a_targets(model)
        grads, features = {}, {}

        def keep_features(module: nn.Module, args: tuple) -> None:  # the official net.before_head_data
            features["h"] = args[0]
            if head == FEATURES:  # WRN: the official hook on the pool's output
                args[0].register_hook(lambda grad: grads.__setitem__(FEATURES, grad.detach()))

        handles = _keep_gradients(model, [*inner, *[head][:head != FEATURES]], grads)
        handles.append(head_module(model).register_forward_pre_hook(keep_features))
        try:
            model.zero_grad()
            y = model(image[None])
            F.log_softmax(y, dim=-1).sum().backward(retain_graph=True)
            output = _spatial_mean(grads[head]).abs().mean(dim=1).sqrt().unsqueeze(1)
            features["h"].sum().backward()
            parts = [(_spatial_mean(grads[name]).abs() / output).pow(2) for name in inner]
        finally:
            for handle in handles:
                handle.remove()
        return {**{name: part.mean().item() for name, part in zip(inner, parts)},
                "total": torch.cat(parts, 1).mean().item(), "class": -1}


class GaiaZ(ActivationDetector):
    """GAIA-Z (``cal_zero``, ``bn`` hooks: every BatchNorm2d of the network, ``get_bn_hooks``, for every
    architecture): one backward pass of the largest logit, L = max_k f(x)_k (dL/dz = e_argmax). For each channel
    c of each BatchNorm output, ρ_c = the fraction of its gradient entries that are not exactly zero (zeros come
    from ReLUs that are off). Score: the mean over every channel of ρ_c², as ``cal_zero`` returns it; ranked by its
    negation, so ID has the smaller value (sign −1). Rows: per BatchNorm, the same mean over its channels."""
    name = "gaia_z"
    paper = GAIA_PAPER
    formula = "mean_c ρ_c², ρ_c = fraction of non-zero entries of ∂max_k f_k/∂a_c at every BatchNorm output a"
    rows = "max_logit"

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype).unsqueeze(0)

    def activations(self, model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if isinstance(model, NormalizedResNet):
            raise ValueError(IN_PLACE)
        if not batchnorms(model):
            raise ValueError(f"GAIA-Z differentiates to BatchNorm outputs; {type(model).__name__} has none")
        return (("nonzero", batchnorms(model)),)

    def reduce(self, results: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        parts = {name: fraction[0].pow(2) for name, fraction in results[0].items()}
        return Scores({name: part.mean(1) for name, part in parts.items()}, torch.cat(list(parts.values()), 1).mean(1),
                      logits.argmax(1))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        names, grads = batchnorms(model), {}
        handles = _keep_gradients(model, names, grads)
        try:
            model.zero_grad()
            y = model(image[None])
            y.max(dim=1).values.sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        squares = [torch.where(grads[name] != 0, 1.0, 0.0).to(y.dtype).mean(dim=(-1, -2)).pow(2) for name in names]
        return {**{name: part.mean().item() for name, part in zip(names, squares)},
                "total": torch.cat(squares, 1).mean().item(), "class": int(y.argmax(1))}
