"""Activation rules: how a detector that differentiates to module *outputs* (GAIA, NAC-UE) reduces the gradient
there, from the engine's one batched pass (``utils.per_sample``), to one value per (row, sample, channel). A rule is
registered by kind (``@activation_rule("mean")``), as the weight rules are by layer type."""
from collections.abc import Callable

import torch

FEATURES = "features"
"""An activation target: the input of the model's head (its last tracked layer, a Linear), the pooled
penultimate features. Every other target names a module (``named_modules()``) whose output is meant."""

ActivationRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ACTIVATION_RULES: dict[str, tuple[ActivationRule, int]] = {}


def activation_rule(kind: str, degree: int = 1) -> Callable[[ActivationRule], ActivationRule]:
    """Register ``rule(activations (B, C, ...), grads (R, B, C, ...)) -> (R, B, C)``: one value per channel of
    the gradient at a module's output. ``degree``: how the value scales with the gradient (1: linearly, 0: not at
    all), so that the engine can undo its unit scaling of dL/dlogits."""
    def register(rule: ActivationRule) -> ActivationRule:
        ACTIVATION_RULES[kind] = rule, degree
        return rule
    return register


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    """(R, B, C, ...) → (R, B, C, S): the S spatial positions of each channel (S = 1 for a (R, B, C) input)."""
    return values.reshape(*values.shape[:3], -1)


@activation_rule("mean")
def gradient_mean(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The spatial mean of the gradient in each channel (GAIA-A)."""
    return _per_channel(grads).mean(3)


@activation_rule("nonzero", degree=0)
def nonzero_fraction(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The fraction of the channel's gradient entries that are not exactly zero (GAIA-Z)."""
    return (_per_channel(grads) != 0).to(grads.dtype).mean(3)


@activation_rule("pooled_product")
def pooled_product(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The activation summed over space times the gradient summed over space, per channel (NAC-UE's o·g)."""
    return _per_channel(activations.unsqueeze(0)).sum(3) * _per_channel(grads).sum(3)
