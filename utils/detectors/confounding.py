"""The confounding label of a one-sigmoid-per-class model (``track_gradient_original.py``)."""

import torch
import torch.nn.functional as F
from torch import nn

from utils.detectors.base import (
    Detector,
    Scores,
    as_reference,
    total_norm,
)
from utils.per_sample import reference_norms


class ConfoundingLabel(Detector):
    """Lee & AlRegib, "Gradients as a Measure of Uncertainty in Neural Networks", ICIP 2020: for a model with
    one sigmoid per class, the gradient of ``BCEWithLogitsLoss(f(x), 1)`` — every class on at once, a label
    no image has; dL/dlogits = (σ(z) − 1)/K. L2 of every tracked layer; +norm as in the original analysis."""
    name = "original"
    paper = "Lee & AlRegib, Gradients as a Measure of Uncertainty in Neural Networks, ICIP 2020"
    formula = "‖∇_W BCEWithLogits(f(x), 1)‖₂ (mean over the K classes)"
    script = "track_gradient_original.py"
    method = "original"
    rows = "confounding"
    sign = +1

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return (-torch.sigmoid(-logits) / logits.shape[1]).unsqueeze(0)  # σ(z) − 1 without cancellation

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        layers = {name: v[0] for name, v in norms[0].items()}
        return Scores(layers, total_norm(layers, 2), torch.full((len(logits),), -1, device=logits.device))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        norms = reference_norms(model, image, lambda z: [F.binary_cross_entropy_with_logits(z, torch.ones_like(z))])
        return as_reference(model, norms[0], 2, -1)
