"""GradNorm: the L1 norm of the gradient of the KL divergence between the uniform distribution and the softmax."""

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


class GradNorm(Detector):
    """Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
    NeurIPS 2021. L = Σ_k −log softmax(f(x)/T)_k (the official code's ``targets = ones``; K·KL(uniform ‖
    softmax) + const), so dL/dlogits = (K·softmax(f(x)/T) − 1)/T. The **L1** norm of each tracked layer's
    gradient; the paper scores the last layer. ID has the larger gradient (+norm)."""
    name = "gradnorm"
    paper = ("Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, "
             "NeurIPS 2021")
    formula = "‖∇_W Σ_k −log softmax(f(x)/T)_k‖₁, last layer"
    norm = 1
    sign = +1
    headline = "last"

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.rows = f"uniform/T={temperature}"

    def options(self) -> dict:
        return {**super().options(), "temperature": float(self.temperature)}

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        K, T = logits.shape[1], self.temperature
        return ((K * (logits / T).softmax(1) - 1) / T).unsqueeze(0)

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        layers = {name: v[0] for name, v in norms[0].items()}
        return Scores(layers, total_norm(layers, 1), torch.full((len(logits),), -1, device=logits.device))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        def official_loss(logits: torch.Tensor) -> list[torch.Tensor]:  # a batch of one, targets = ones
            outputs = logits / self.temperature
            targets = torch.ones_like(outputs)
            return [torch.mean(torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1))]

        return as_reference(model, reference_norms(model, image, official_loss, p=1)[0], 1, -1)
