"""What every detector unit is (``Detector``), what it returns (``Scores``), and the helpers the units share:
the cross-entropy rows without cancellation, norms over layers, and the reference loops' bookkeeping."""
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from models import tracked_parameters

ALL_LAYERS = None


@dataclass
class Scores:
    """One detector's values for each sample of a batch of B."""
    layers: dict[str, torch.Tensor]  # per tracked weight, model order: the detector's norm of it, (B,)
    total: torch.Tensor              # the same over all tracked weights together, (B,)
    chosen: torch.Tensor             # the label of the kept loss, (B,) int64; -1 where no single label is kept
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # further per-sample rows, e.g. a paper's form
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample vectors (B, D), e.g. NAC's states


def l2_norm(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The L2 norm along ``dim``, scaled by the largest entry first so that tiny values do not underflow."""
    largest = values.amax(dim, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return largest.squeeze(dim) * (values / largest).pow(2).sum(dim).sqrt()


def total_norm(layers: dict[str, torch.Tensor], p: int) -> torch.Tensor:
    """The p-norm over all tracked weights together from the per-layer p-norms (stacked on dim 0)."""
    stacked = torch.stack(list(layers.values()))
    return l2_norm(stacked, 0) if p == 2 else stacked.sum(0)


def cross_entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """dL/dlogits of the cross-entropy with each label k, softmax(z) − e_k: (K, B, K).

    Computed without cancellation: p_k − 1 as −Σ_{j≠k} p_j. (Autograd's softmax(z) − e_k rounds p_k − 1 to 0
    once p_k is within float precision of 1, a confident prediction.)"""
    probs = logits.softmax(1)
    labels = torch.eye(logits.shape[1], dtype=probs.dtype, device=probs.device).unsqueeze(1)  # (K, 1, K)
    others = probs * (1 - labels)
    return others - labels * others.sum(2, keepdim=True)


def cross_entropy_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """dL/dlogits of the cross-entropy with label ``labels[b]`` for each sample, (B, K): one row of
    ``cross_entropy_rows`` per sample, without building the K of them."""
    others = logits.softmax(1).scatter(1, labels[:, None], 0.0)
    return others.scatter(1, labels[:, None], -others.sum(1, keepdim=True))


def cross_entropy_row_norms(logits: torch.Tensor, p: int) -> torch.Tensor:
    """‖softmax(z) − e_k‖_p of every label k, (K, B), in closed form with no (K, B, K) rows: with s_k = Σ_{j≠k} p_j
    (= 1 − p_k), ‖·‖₁ = 2 s_k and ‖·‖₂² = Σ_{j≠k} p_j² + s_k². For the predicted label both sums are taken over the
    other classes directly (1 − p_k and ‖p‖² − p_k² would cancel to 0 for a confident prediction); for any other
    label p_k ≤ max_j p_j keeps the subtraction within a factor K of float precision."""
    probs = logits.softmax(1)
    top = probs.argmax(1, keepdim=True)
    others = probs.scatter(1, top, 0.0)
    rest = (probs.sum(1, keepdim=True) - probs).scatter(1, top, others.sum(1, keepdim=True))  # s_k, (B, K)
    if p == 1:
        return (2 * rest).T
    squares = (probs.pow(2).sum(1, keepdim=True) - probs.pow(2)).scatter(1, top, others.pow(2).sum(1, keepdim=True))
    return (squares.clamp_min(0) + rest.pow(2)).sqrt().T


def ce_losses(logits: torch.Tensor) -> list[torch.Tensor]:
    """The cross-entropy with each label k, as a loop computes it."""
    return [F.cross_entropy(logits, torch.tensor([k], device=logits.device)) for k in range(logits.shape[1])]


def as_reference(model: nn.Module, norms: torch.Tensor, p: int, chosen: int) -> dict[str, float]:
    """One row of ``reference_norms`` as {layer: value, "total": value, "class": chosen}."""
    total = norms.pow(2).sum().sqrt() if p == 2 else norms.sum()
    return {**dict(zip(tracked_parameters(model), norms.tolist())), "total": total.item(), "class": chosen}


class Detector:
    """One gradient detector (see the module's docstring); subclasses fill in the rows, the reduction and the
    batch-of-one definition."""
    name: str
    paper: str
    formula: str
    script = "track_gradient.py"
    method = "norm"          # the file's "method": "norm", or "original" for the confounding label
    rows: str                # detectors with the same key back-propagate the same rows
    norm: int = 2
    sign: int = -1           # +1: a larger gradient means in-distribution
    headline = "total"       # the row a comparison reports: "total" or "last" (see headline_row)
    last_layer_only = False  # ``--layers last``: only the head is tracked (``last_layer_scores``)
    separate_pass = False    # computes its own values (``scores``) instead of the engine's weight-gradient norms
    fits_on_training = False  # True: the rows are fit on the ID training images' file (NAC-UE, utils.coverage)
    fit_first = False        # True: its pass needs a fit on the ID training images made before it (``fit``)
    in_score_all = True      # False: left out of ``--score all`` for its cost (asked for by name only)

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def row_norms(self, logits: torch.Tensor, p: int) -> torch.Tensor:
        """‖dL/dlogits‖_p of each of its rows, (R, B): what ``--layers last`` multiplies by ‖h‖_p (a rank-one
        gradient). From ``output_gradients`` unless a unit has a closed form that needs no (R, B, K) rows."""
        rows = self.output_gradients(logits)
        return rows.abs().sum(2) if p == 1 else l2_norm(rows.abs(), 2)

    def feature_gradients(self, logits: torch.Tensor) -> torch.Tensor | None:
        """dL/dfeatures (R, B, 1), broadcast over the head's inputs, of rows whose loss also depends on the pooled
        features directly (GAIA's Σ of the features); None: the losses depend on the logits alone."""
        return None

    def requests(self, last_layer: str) -> tuple[tuple[int, frozenset[str] | None], ...]:
        """The norms ``reduce`` needs of this detector's rows: (p, layers or ALL_LAYERS) each."""
        return ((self.norm, ALL_LAYERS),)

    def activations(self, model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The activation gradients ``reduce`` needs after the norms: (rule kind, module outputs) each."""
        return ()

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        """Per-row norms (R, B) of each request, then each activation request's per-channel values (R, B, C) by
        target, in order → one value per layer and sample."""
        raise NotImplementedError

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        """The definition, for one image (3, H, W) and a model in eval mode: every tracked layer's value,
        ``total``, any extra rows, and ``class`` (the kept label, -1 if none)."""
        raise NotImplementedError

    def options(self) -> dict:
        """Settings that change the values (saved in the file; a file with other options is re-tracked)."""
        return {"layers": "last"} if self.last_layer_only else {}

    @property
    def folder(self) -> str:
        """Its folder under ``gradients/<in-dataset>/<model>/``: its name, ``<name>-last`` for ``--layers last``
        (so that last-layer files and full ones never replace each other)."""
        return f"{self.name}-last" if self.last_layer_only else self.name

    @property
    def has_weight_gradients(self) -> bool:
        """Whether its values are norms of weight gradients, which ``--layers last`` can restrict to the last layer
        (not ODIN's input perturbation, nor GAIA's and NAC-UE's activation gradients)."""
        return not self.separate_pass and bool(self.requests(""))

    def on_last_layer(self) -> "Detector":
        """This detector tracking only the last Linear layer (``--layers last``)."""
        if not self.has_weight_gradients:
            raise ValueError(f"{self.name} has no per-layer weight gradients; --layers last does not apply to it")
        last = copy.copy(self)
        last.last_layer_only = True
        return last

    def scores(self, model: nn.Module, x: torch.Tensor, tf32: bool = False) -> tuple[torch.Tensor, Scores]:
        """For a ``separate_pass`` detector: the logits (B, K) and its values on images ``x``."""
        raise NotImplementedError

    def fit(self, model: nn.Module, training: Dataset, device: torch.device, batch_size: int) -> "Detector":
        """For a ``fit_first`` detector: a copy of it fit on the ``training`` images (image, label pairs)."""
        raise NotImplementedError

    def from_state(self, state: dict) -> "Detector":
        """For a ``fit_first`` detector: a copy of it holding the fit saved as ``state`` (its fit's ``state()``)."""
        raise NotImplementedError

    def fit_description(self) -> dict:
        """For a fitted ``fit_first`` detector: what it was fit on (saved in every file it writes)."""
        raise NotImplementedError

    def headline_row(self, layers: Sequence[str]) -> str:
        return layers[-1] if self.headline == "last" else self.headline


class ActivationDetector(Detector):
    """A detector of gradients at module *outputs* (``activations``), not of weights: it requests no weight-gradient
    norms, and its values are not norms (the file's ``norm`` is ``none``)."""
    norm = None

    def requests(self, last_layer: str) -> tuple:
        return ()
