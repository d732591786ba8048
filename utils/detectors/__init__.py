"""The gradient detectors, one unit each: what each one computes, and how the engine computes it batched.

A detector names a loss L(x) with no label (there is none at test time) and scores an image by the norm of
the weight gradient dL/dW of each tracked layer. Each unit states:

* ``name`` — its ``--score`` and folder under ``gradients/<in-dataset>/<model>/``; ``paper``; ``formula``;
* ``output_gradients(logits)`` — dL/dlogits of the R losses it needs per image, (R, B, K), the rows the
  engine back-propagates; detectors with the same ``rows`` key need the same rows, so ``--score all``
  back-propagates them once;
* ``requests`` and ``reduce`` — which norms of those rows it needs (L1 or L2, every tracked layer or the
  last) and how they become one value per layer and sample (keep the smallest row, take an expectation …);
* ``norm`` (1 or 2), ``sign`` (+1: a larger norm means in-distribution, −1: a smaller one) and ``headline``
  (the row a comparison reports: ``total``, the last layer, or an extra row);
* ``reference(model, image)`` — its definition: a batch of one, ``loss.backward()``, ``p.grad`` read per
  layer, written as the paper's code does it. The tests hold the batched version to it in float64.

Detectors of activation gradients (GAIA) name instead, in ``activations(model)``, the module outputs whose
gradients they need and the per-channel rule that reduces them (``utils.activation_rules.activation_rule``); the
engine serves them from the same forward and backward pass. A row group may seed the features as well as the
logits (``feature_gradients``).

Adding a detector is one class here (and its test). Each sample's value is its batch-of-one value:
nothing is ever averaged over a batch.

Two ways out of the engine: a ``separate_pass`` detector computes its values itself (``scores``; ODIN
differentiates with respect to the input and runs a second forward pass), and ``on_last_layer()`` gives a
detector that tracks only the head (a Linear layer, or a 1×1 convolution on a 1×1 map as BiT's), computed from the
penultimate features with no backward pass (``last_layer_scores``; ``--layers last``: its files say so in
``options`` and live in ``<name>-last/``).

A ``fit_first`` detector (GROOD, the low-dimensional gradient) needs a fit on ID training images before its pass:
``fit(model, training, …)`` returns a copy holding it (``from_state`` rebuilds one from a saved fit), and tracking
makes it first. ``in_score_all = False`` leaves a detector out of ``--score all`` (``SCORE_ALL``) for its cost.
"""
from collections.abc import Sequence

import torch
from torch import nn

from models import tracked_parameters
from utils.detectors.base import ALL_LAYERS, Detector, Scores, ce_losses, cross_entropy_rows, l2_norm
from utils.detectors.confounding import ConfoundingLabel
from utils.detectors.cross_entropy import CrossEntropy, ExGrad, Predicted
from utils.detectors.gaia import GaiaA, GaiaZ, batchnorms, gaia_a_targets
from utils.detectors.gradnorm import GradNorm
from utils.detectors.grood import Grood
from utils.detectors.lowdim import LowDim
from utils.detectors.nac import NAC_HYPER, NacUE, nac_hyper, nac_layers
from utils.detectors.odin import ODIN
from utils.per_sample import eval_mode, tf32_mode, tracked_layers, weight_gradient_norms

__all__ = ["ALL_LAYERS", "CONFOUNDING", "DETECTORS", "NAC_HYPER", "ODIN", "TRACK_GRADIENT_SCORES", "ConfoundingLabel",
           "CrossEntropy", "Detector", "ExGrad", "GaiaA", "GaiaZ", "GradNorm", "Grood", "LowDim", "NacUE", "Predicted",
           "SCORE_ALL", "Scores",
           "batchnorms", "ce_losses", "cross_entropy_rows", "gaia_a_targets", "get_detector", "gradient_scores",
           "last_layer_scores", "nac_hyper", "nac_layers", "rows_per_sample"]

DETECTORS: dict[str, Detector] = {d.name: d for d in (
    CrossEntropy("min", "min_k ‖∇_W CE(f(x), k)‖₂ (the class with the smallest total norm)", sign=-1),
    CrossEntropy("max", "max_k ‖∇_W CE(f(x), k)‖₂ (the class with the largest total norm)", sign=+1),
    Predicted(), GradNorm(), ExGrad(), ODIN(), ConfoundingLabel(), GaiaA(), GaiaZ(), NacUE(), Grood(), LowDim())}


CONFOUNDING = DETECTORS["original"]


TRACK_GRADIENT_SCORES = tuple(name for name, d in DETECTORS.items() if d.script == "track_gradient.py")
SCORE_ALL = tuple(name for name in TRACK_GRADIENT_SCORES if DETECTORS[name].in_score_all)  # what --score all tracks


def get_detector(name: str | None, temperature: float = 1.0, odin_temperature: float = 1000.0, epsilon: float = 0.0014,
                 lowdim_subspace: str = "principal", lowdim_projection: str = "jvp") -> Detector:
    """The detector called ``name`` (None or ``original``: the confounding label); ``temperature`` for GradNorm,
    ``odin_temperature`` and ``epsilon`` for ODIN, ``lowdim_subspace`` and ``lowdim_projection`` for the
    low-dimensional gradient."""
    name = name or "original"
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    if name == "odin":
        return ODIN(odin_temperature, epsilon)
    if name == "lowdim":
        return LowDim(subspace=lowdim_subspace, projection=lowdim_projection)
    return GradNorm(temperature) if name == "gradnorm" else DETECTORS[name]


def rows_per_sample(detectors: Sequence[Detector], num_classes: int) -> int:
    """How many gradients are back-propagated per image for these detectors together (what ``--batch-size``
    counts): each distinct set of rows once; none for ``--layers last`` (then an image counts as one)."""
    logits = torch.zeros(1, num_classes)
    backward = {d.rows: d for d in detectors if not d.last_layer_only}.values()
    return max(1, sum(len(d.output_gradients(logits)) for d in backward))


def gradient_scores(model: nn.Module, x: torch.Tensor, detectors: Sequence[Detector], tf32: bool = False
                    ) -> tuple[torch.Tensor, dict[str, Scores]]:
    """Every detector's per-sample values on images ``x`` (B, 3, H, W), from one forward pass and one batched
    backward pass of the rows they need (each distinct set once). The model runs in eval mode; its modes are
    restored afterwards; TF32 is off on a GPU unless ``tf32`` (``utils.per_sample.tf32_mode``). Returns the
    logits (B, K) and each detector's ``Scores`` by name. A ``separate_pass`` detector (ODIN) runs its own
    passes; detectors with ``last_layer_only`` go to ``last_layer_scores``."""
    own = {d.name: d.scores(model, x, tf32) for d in detectors if d.separate_pass}  # name → (logits, Scores)
    last_only = [d for d in detectors if d.last_layer_only]
    if last_only:
        logits, last = last_layer_scores(model, x, last_only, tf32)
        own.update((name, (logits, values)) for name, values in last.items())
    shared = [d for d in detectors if not (d.separate_pass or d.last_layer_only)]
    if not shared:
        return next(iter(own.values()))[0], {name: values for name, (_, values) in own.items()}
    logits, scores = _engine_scores(model, x, shared, tf32)
    return logits, {**scores, **{name: values for name, (_, values) in own.items()}}


def _engine_scores(model: nn.Module, x: torch.Tensor, detectors: Sequence[Detector], tf32: bool
                   ) -> tuple[torch.Tensor, dict[str, Scores]]:
    """``gradient_scores`` of the detectors served by the engine's weight-gradient norms."""
    last_layer = list(tracked_parameters(model))[-1]
    groups = list({d.rows: d for d in detectors}.values())  # one detector per distinct set of rows builds them
    group_of = {d.rows: i for i, d in enumerate(groups)}
    wanted = {d.name: (*d.requests(last_layer), *d.activations(model)) for d in detectors}
    requests = list(dict.fromkeys((group_of[d.rows], *request) for d in detectors for request in wanted[d.name]))

    def rows(logits: torch.Tensor) -> list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        seeds = [(d.output_gradients(logits), d.feature_gradients(logits)) for d in groups]
        return [logit_rows if features is None else (logit_rows, features) for logit_rows, features in seeds]

    with eval_mode(model):
        logits, results = weight_gradient_norms(model, x, rows, tuple(requests), tf32)
    by_request = dict(zip(requests, results))
    scores = {d.name: d.reduce([by_request[(group_of[d.rows], *request)] for request in wanted[d.name]], logits)
              for d in detectors}
    return logits, scores


def last_layer_scores(model: nn.Module, x: torch.Tensor, detectors: Sequence[Detector], tf32: bool = False
                      ) -> tuple[torch.Tensor, dict[str, Scores]]:
    """``--layers last``: each detector's values on the last tracked layer alone, from one forward pass and no
    backward pass through the network.

    That layer is a Linear map of the penultimate features h that gives the logits (or a 1×1 convolution of the
    pooled 1×1 map, the same map), so the per-sample gradient of a loss with dL/dlogits = δ is δhᵀ, of rank one:
    ‖δhᵀ‖₁ = ‖δ‖₁‖h‖₁ and ‖δhᵀ‖₂ = ‖δ‖₂‖h‖₂. A forward hook keeps h; each detector's ‖δ‖ per row comes from its
    ``row_norms`` (closed forms for the K cross-entropy rows of min/max/exgrad: ‖p − e_k‖ with no (K, B, K) tensor,
    so 1,000 classes cost O(K) a sample); its ``reduce`` sees that layer only (its ``total`` is then that layer's
    value). TF32 is off unless ``tf32``, as in the engine. Returns the logits (B, K) and each detector's ``Scores``
    by name."""
    (name, layer), = list(tracked_layers(model).items())[-1:]
    pointwise = isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.padding == (0, 0)
    if not (isinstance(layer, nn.Linear) or pointwise):
        raise ValueError(f"--layers last needs a Linear or 1x1-convolution last layer; {name} is a "
                         f"{type(layer).__name__}")
    kept = {}
    handle = layer.register_forward_hook(lambda module, args, output: kept.update(h=args[0], out=output))
    try:
        with eval_mode(model), tf32_mode(tf32), torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if not (_gives_logits(kept.get("out"), logits) and kept["h"].flatten(1).shape[1] == kept["h"].shape[1]):
        raise ValueError(f"--layers last needs {name} to map (B, D) features (or a (B, D, 1, 1) map) to the model's "
                         "logits")
    h = kept["h"].flatten(1)
    h_norms = {1: h.abs().sum(1), 2: l2_norm(h.abs(), 1)}
    row_norms = {}  # (rows, p) → (R, B), each distinct set once
    scores = {}
    for d in detectors:
        norms = []
        for p, _ in d.requests(name):
            if (d.rows, p) not in row_norms:
                row_norms[d.rows, p] = d.row_norms(logits, p)
            norms.append({name: row_norms[d.rows, p] * h_norms[p]})
        scores[d.name] = d.reduce(norms, logits)
    return logits, scores


def _gives_logits(output: torch.Tensor | None, logits: torch.Tensor) -> bool:
    """Whether the head's ``output`` is the logits: the same tensor, or (a 1×1 convolution's (B, K, 1, 1)) the
    tensor whose view ``[..., 0, 0]`` they are."""
    if output is None or output is logits:
        return output is not None
    return (output.dim() == 4 and output.shape[2:] == (1, 1) and output.shape[:2] == logits.shape
            and output.data_ptr() == logits.data_ptr())
