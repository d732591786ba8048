"""The detectors of the K per-class cross-entropy gradients: the seed's ``min``, ``max`` and ``pred``, and ExGrad
(their expectation under the model's prediction)."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import tracked_parameters
from utils.detectors.base import (
    ALL_LAYERS,
    Detector,
    Scores,
    as_reference,
    ce_losses,
    cross_entropy_row,
    cross_entropy_row_norms,
    cross_entropy_rows,
    total_norm,
)
from utils.per_sample import reference_norms


class CrossEntropy(Detector):
    """The seed's family: the cross-entropy loss with each label k, L_k(x) = −log softmax(f(x))_k, and the
    gradient of one of them kept per image. L2 norm of every tracked layer; ID has the smaller gradient."""
    paper = "the seed's per-class cross-entropy gradients"
    rows = "cross_entropy"

    def __init__(self, name: str, formula: str, sign: int):
        self.name, self.formula, self.sign = name, formula, sign

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return cross_entropy_rows(logits)

    def row_norms(self, logits: torch.Tensor, p: int) -> torch.Tensor:
        return cross_entropy_row_norms(logits, p)

    def _row(self, totals: torch.Tensor) -> torch.Tensor:
        return totals.argmin(0) if self.name == "min" else totals.argmax(0)

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        layers = norms[0]
        totals = total_norm(layers, 2)  # (K, B)
        row = self._row(totals).unsqueeze(0)
        return Scores({name: v.gather(0, row)[0] for name, v in layers.items()}, totals.gather(0, row)[0], row[0])

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        norms = reference_norms(model, image, ce_losses)  # (K, L)
        k = int(self._row(norms.pow(2).sum(1)))
        return as_reference(model, norms[k], 2, k)


class Predicted(Detector):
    name = "pred"
    paper = "the seed's per-class cross-entropy gradients"
    formula = "‖∇_W CE(f(x), argmax_k f(x)_k)‖₂"
    rows = "predicted"

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return cross_entropy_row(logits, logits.argmax(1)).unsqueeze(0)

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        layers = {name: v[0] for name, v in norms[0].items()}
        return Scores(layers, total_norm(layers, 2), logits.argmax(1))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        label = int(model(image[None]).argmax(1))
        norms = reference_norms(model, image, lambda z: [F.cross_entropy(z, z.argmax(1))])
        return as_reference(model, norms[0], 2, label)


class ExGrad(Detector):
    """Igoe, Chung, Char & Schneider, "How Useful are Gradients for OOD Detection Really?", 2022: the norm of
    the cross-entropy gradient expected under the model's own prediction, Σ_k p_k ‖∇_W −log p_k‖, p =
    softmax(f(x)). Per layer and over all tracked layers with the L2 norm, from the K per-class gradients
    that ``min``/``max`` compute too; the paper's form, the last layer's L1 norm, is the extra row
    ``<last layer>:L1`` and the headline. ID has the smaller expected gradient (−norm)."""
    name = "exgrad"
    paper = "Igoe, Chung, Char & Schneider, How Useful are Gradients for OOD Detection Really?, 2022"
    formula = "Σ_k p_k ‖∇_W −log p_k‖ (L2 per layer; the paper's L1 of the last layer)"
    rows = "cross_entropy"

    @staticmethod
    def extra_row(last_layer: str) -> str:
        return f"{last_layer}:L1"

    def headline_row(self, layers: Sequence[str]) -> str:
        return self.extra_row(layers[-1])

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return cross_entropy_rows(logits)

    def row_norms(self, logits: torch.Tensor, p: int) -> torch.Tensor:
        return cross_entropy_row_norms(logits, p)

    def requests(self, last_layer: str) -> tuple[tuple[int, frozenset[str] | None], ...]:
        return ((2, ALL_LAYERS), (1, frozenset({last_layer})))

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        (layers, last_l1), probs = norms, logits.softmax(1).T  # probs: (K, B)
        (last, l1), = last_l1.items()
        return Scores({name: (probs * v).sum(0) for name, v in layers.items()}, (probs * total_norm(layers, 2)).sum(0),
                      torch.full((len(logits),), -1, device=logits.device), {self.extra_row(last): (probs * l1).sum(0)})

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        probs = model(image[None]).softmax(1)[0].detach()  # (K,)
        l2 = reference_norms(model, image, ce_losses)  # (K, L): each label's gradient, per layer
        last_l1 = reference_norms(model, image, ce_losses, p=1)[:, -1]
        expected = as_reference(model, probs @ l2, 2, -1)
        expected["total"] = (probs @ l2.pow(2).sum(1).sqrt()).item()
        expected[self.extra_row(list(tracked_parameters(model))[-1])] = (probs @ last_l1).item()
        return expected
