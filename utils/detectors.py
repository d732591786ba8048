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
gradients they need and the per-channel rule that reduces them (``utils.per_sample.activation_rule``); the
engine serves them from the same forward and backward pass. A row group may seed the features as well as the
logits (``feature_gradients``).

Adding a detector is one class here (and its test). Each sample's value is its batch-of-one value:
nothing is ever averaged over a batch.

Two ways out of the engine: a ``separate_pass`` detector computes its values itself (``scores``; ODIN
differentiates with respect to the input and runs a second forward pass), and ``on_last_layer()`` gives a
detector that tracks only the last Linear layer, computed from the penultimate features with no backward pass
(``last_layer_scores``; ``--layers last``: its files say so in ``options`` and live in ``<name>-last/``).
"""
import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models import tracked_parameters
from models.resnet import CifarResNet, ResNet18
from models.wrn import WideResNet
from utils.per_sample import FEATURES, eval_mode, reference_norms, tf32_mode, tracked_layers, weight_gradient_norms

ALL_LAYERS = None


@dataclass
class Scores:
    """One detector's values for each sample of a batch of B."""
    layers: dict[str, torch.Tensor]  # per tracked weight, model order: the detector's norm of it, (B,)
    total: torch.Tensor              # the same over all tracked weights together, (B,)
    chosen: torch.Tensor             # the label of the kept loss, (B,) int64; -1 where no single label is kept
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # further per-sample rows, e.g. a paper's form
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample vectors (B, D), e.g. NAC's states


def _l2(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The L2 norm along ``dim``, scaled by the largest entry first so that tiny values do not underflow."""
    largest = values.amax(dim, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return largest.squeeze(dim) * (values / largest).pow(2).sum(dim).sqrt()


def _total(layers: dict[str, torch.Tensor], p: int) -> torch.Tensor:
    """The p-norm over all tracked weights together from the per-layer p-norms (stacked on dim 0)."""
    stacked = torch.stack(list(layers.values()))
    return _l2(stacked, 0) if p == 2 else stacked.sum(0)


def cross_entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """dL/dlogits of the cross-entropy with each label k, softmax(z) − e_k: (K, B, K).

    Computed without cancellation: p_k − 1 as −Σ_{j≠k} p_j. (Autograd's softmax(z) − e_k rounds p_k − 1 to 0
    once p_k is within float precision of 1, a confident prediction.)"""
    probs = logits.softmax(1)
    labels = torch.eye(logits.shape[1], dtype=probs.dtype, device=probs.device).unsqueeze(1)  # (K, 1, K)
    others = probs * (1 - labels)
    return others - labels * others.sum(2, keepdim=True)


def _ce_losses(logits: torch.Tensor) -> list[torch.Tensor]:
    """The cross-entropy with each label k, as a loop computes it."""
    return [F.cross_entropy(logits, torch.tensor([k], device=logits.device)) for k in range(logits.shape[1])]


def _as_dict(model: nn.Module, norms: torch.Tensor, p: int, chosen: int) -> dict[str, float]:
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
    last_layer_only = False  # ``--layers last``: only the last Linear layer is tracked (``last_layer_scores``)
    separate_pass = False    # computes its own values (``scores``) instead of the engine's weight-gradient norms
    fits_on_training = False  # True: the rows are fit on the ID training images' file (NAC-UE, utils.coverage)

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def headline_row(self, layers: Sequence[str]) -> str:
        return layers[-1] if self.headline == "last" else self.headline


class CrossEntropy(Detector):
    """The seed's family: the cross-entropy loss with each label k, L_k(x) = −log softmax(f(x))_k, and the
    gradient of one of them kept per image. L2 norm of every tracked layer; ID has the smaller gradient."""
    paper = "the seed's per-class cross-entropy gradients"
    rows = "cross_entropy"

    def __init__(self, name: str, formula: str, sign: int):
        self.name, self.formula, self.sign = name, formula, sign

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return cross_entropy_rows(logits)

    def _row(self, totals: torch.Tensor) -> torch.Tensor:
        return totals.argmin(0) if self.name == "min" else totals.argmax(0)

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        layers = norms[0]
        totals = _total(layers, 2)  # (K, B)
        row = self._row(totals).unsqueeze(0)
        return Scores({name: v.gather(0, row)[0] for name, v in layers.items()}, totals.gather(0, row)[0], row[0])

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        norms = reference_norms(model, image, _ce_losses)  # (K, L)
        k = int(self._row(norms.pow(2).sum(1)))
        return _as_dict(model, norms[k], 2, k)


class Predicted(Detector):
    name = "pred"
    paper = "the seed's per-class cross-entropy gradients"
    formula = "‖∇_W CE(f(x), argmax_k f(x)_k)‖₂"
    rows = "predicted"

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        rows = cross_entropy_rows(logits)  # (K, B, K)
        return rows.gather(0, logits.argmax(1)[None, :, None].expand(1, *logits.shape))

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        layers = {name: v[0] for name, v in norms[0].items()}
        return Scores(layers, _total(layers, 2), logits.argmax(1))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        label = int(model(image[None]).argmax(1))
        norms = reference_norms(model, image, lambda z: [F.cross_entropy(z, z.argmax(1))])
        return _as_dict(model, norms[0], 2, label)


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
        return Scores(layers, _total(layers, 2), torch.full((len(logits),), -1, device=logits.device))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        norms = reference_norms(model, image, lambda z: [F.binary_cross_entropy_with_logits(z, torch.ones_like(z))])
        return _as_dict(model, norms[0], 2, -1)


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
        return Scores(layers, _total(layers, 1), torch.full((len(logits),), -1, device=logits.device))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        def official_loss(logits: torch.Tensor) -> list[torch.Tensor]:  # a batch of one, targets = ones
            outputs = logits / self.temperature
            targets = torch.ones_like(outputs)
            return [torch.mean(torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1))]

        return _as_dict(model, reference_norms(model, image, official_loss, p=1)[0], 1, -1)


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

    def requests(self, last_layer: str) -> tuple[tuple[int, frozenset[str] | None], ...]:
        return ((2, ALL_LAYERS), (1, frozenset({last_layer})))

    def reduce(self, norms: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        (layers, last_l1), probs = norms, logits.softmax(1).T  # probs: (K, B)
        (last, l1), = last_l1.items()
        return Scores({name: (probs * v).sum(0) for name, v in layers.items()}, (probs * _total(layers, 2)).sum(0),
                      torch.full((len(logits),), -1, device=logits.device), {self.extra_row(last): (probs * l1).sum(0)})

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        probs = model(image[None]).softmax(1)[0].detach()  # (K,)
        l2 = reference_norms(model, image, _ce_losses)  # (K, L): each label's gradient, per layer
        last_l1 = reference_norms(model, image, _ce_losses, p=1)[:, -1]
        expected = _as_dict(model, probs @ l2, 2, -1)
        expected["total"] = (probs @ l2.pow(2).sum(1).sqrt()).item()
        expected[self.extra_row(list(tracked_parameters(model))[-1])] = (probs @ last_l1).item()
        return expected


class ODIN(Detector):
    """Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018 (official code: facebookresearch/odin, ``code/calData.py``; OpenOOD's
    ``odin_postprocessor.py``). The image is moved against the gradient of the temperature-scaled
    cross-entropy with the predicted label ŷ = argmax_k f(x)_k,

        x̃ = x − ε · sign(∇ₓ CE(f(x)/T, ŷ)) = x − ε · sign(−∇ₓ log softmax(f(x)/T)_ŷ),

    and scored by the maximum softmax of the moved image at the same temperature, max_k softmax(f(x̃)/T)_k.
    ID has the larger score (+). As in the official code, sign(0) counts as +1 (``torch.ge(grad, 0)``) and x̃
    is not clipped to [0, 1].

    Units of ε: the official code differentiates with respect to the normalised image z = (x − μ)/σ and steps
    z̃ = z − ε·sign(∇_z L)/σ per channel, which on the [0, 1] image is x̃ = σz̃ + μ = x − ε·sign(∇_z L), and
    sign(∇_z L) = sign(σ∇ₓ L) = sign(∇ₓ L). So the official ε is a step on [0, 1] pixel values, the same for
    every channel; our models take [0, 1] images and normalise inside, so ε steps the [0, 1] image directly —
    the official perturbation exactly, whatever the model's normalisation (``reference`` takes the official
    path through the normalised image and the tests hold the two equal). Defaults: T = 1000 (the paper's)
    and ε = 0.0014 (OpenOOD's CIFAR config, ``configs/postprocessors/odin.yml``).

    Batched: one forward pass, one backward pass to the input for the whole batch (in eval mode each image's
    input gradient is its own), then a forward pass of the perturbed batch. ``total`` is the score; ODIN has
    no per-layer parts, so the record's ``layers`` holds the same values once, as the row ``perturbed_msp``
    (what they are), and its ``norm`` is ``none``. ``class`` is ŷ, the label of the loss it differentiates."""
    name = "odin"
    paper = ("Liang, Li & Srikant, Enhancing The Reliability of Out-of-distribution Image Detection in Neural "
             "Networks, ICLR 2018")
    formula = "max_k softmax(f(x̃)/T)_k, x̃ = x − ε·sign(−∇ₓ log max_k softmax(f(x)/T)_k)"
    norm = None
    sign = +1
    separate_pass = True
    row = "perturbed_msp"

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014):
        self.temperature, self.epsilon = temperature, epsilon
        self.rows = f"odin/T={temperature}"

    def options(self) -> dict:
        return {"temperature": float(self.temperature), "epsilon": float(self.epsilon)}

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        """dL/dlogits of CE(f(x)/T, ŷ): (softmax(f(x)/T) − e_ŷ)/T, (1, B, K), without cancellation."""
        rows = cross_entropy_rows(logits / self.temperature)  # (K, B, K)
        return rows.gather(0, logits.argmax(1)[None, :, None].expand(1, *logits.shape)) / self.temperature

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits / self.temperature).softmax(1).amax(1)

    def scores(self, model: nn.Module, x: torch.Tensor, tf32: bool = False) -> tuple[torch.Tensor, Scores]:
        with eval_mode(model), tf32_mode(tf32), torch.enable_grad():
            inputs = x.detach().requires_grad_()
            logits = model(inputs)
            gradient, = torch.autograd.grad(logits, inputs, self.output_gradients(logits.detach())[0])
            step = torch.where(gradient >= 0, 1.0, -1.0).to(x.dtype)
            with torch.no_grad():
                score = self._score(model(x.detach() - self.epsilon * step))
        return logits.detach(), Scores({self.row: score}, score, logits.detach().argmax(1))

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        """The official path: the network on the normalised image z, ``loss.backward()`` to z, z − ε·sign/σ."""
        mean, std = model.normalize.mean.to(image.dtype), model.normalize.std.to(image.dtype)
        with _normalised_inputs(model):
            inputs = ((image[None] - mean) / std).requires_grad_()
            outputs = model(inputs)
            label = outputs.detach().argmax(1)
            F.cross_entropy(outputs / self.temperature, label).backward()
            gradient = (torch.ge(inputs.grad, 0).to(image.dtype) - 0.5) * 2 / std
            perturbed = inputs.detach() - self.epsilon * gradient
            score = self._score(model(perturbed).detach())[0].item()
        return {self.row: score, "total": score, "class": int(label)}


@contextmanager
def _normalised_inputs(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with the model's input normalisation switched off: it takes normalised images, as the
    official codes' networks do."""
    normalize = model.normalize
    model.normalize = nn.Identity()
    try:
        yield model
    finally:
        model.normalize = normalize


# GAIA (Chen et al., NeurIPS 2023): gradients at BatchNorm outputs rather than weights. Official code:
# JGEthanChen/GAIA-OOD, cal_method.py (cal_grad_value, cal_zero) and hook.py (get_beforehead_hooks, get_bn_hooks).
GAIA_PAPER = ("Chen, Li, Qu, Wang, Wan & Xiao, GAIA: Delving into Gradient-based Attribution Abnormality for "
              "Out-of-distribution Detection, NeurIPS 2023")


def batchnorms(module: nn.Module, prefix: str = "") -> tuple[str, ...]:
    """The BatchNorm2d modules of ``module`` by name, in ``modules()`` order (the order of the official hooks)."""
    return tuple(f"{prefix}{name}" for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d))


def gaia_a_targets(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """GAIA-A's hooked BatchNorm outputs and its pre-head target: the official ``get_beforehead_hooks`` choice,
    mapped onto our architectures.

    * ResNets (official ``resnet18/34/50``: every BatchNorm of ``layer3`` and ``layer4``, then ``layer4``'s output,
      the feature map the head pools): every BatchNorm of the **last two stages** and the last stage's output.
      ResNet-18 is the official network (``layer3``, ``layer4``, shortcut BatchNorms included); ResNet-20/32/56
      have three stages, so ``layer2`` and ``layer3`` (option-A shortcuts: no BatchNorm there).
    * WRN-40-2 (official ``wrn_40_2``: every BatchNorm, then the ``AdaptiveAvgPool2d`` output): every BatchNorm
      and ``FEATURES``, the head's input, which is that pool's output flattened (ours pools functionally).
    """
    if isinstance(model, WideResNet):
        return batchnorms(model), FEATURES
    if isinstance(model, (CifarResNet, ResNet18)):
        stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
        return sum((batchnorms(getattr(model, stage), f"{stage}.") for stage in stages[-2:]), ()), stages[-1]
    raise ValueError(f"GAIA's layer choice is defined for the ResNets and WRN-40-2, not {type(model).__name__}")


def _head(model: nn.Module) -> nn.Module:
    """The module of the last tracked weight: the head, whose input is the pooled features."""
    return list(tracked_layers(model).values())[-1]


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


class GaiaA(Detector):
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

    def requests(self, last_layer: str) -> tuple:
        return ()

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
        handles.append(_head(model).register_forward_pre_hook(keep_features))
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


class GaiaZ(Detector):
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

    def requests(self, last_layer: str) -> tuple:
        return ()

    def activations(self, model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
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


# NAC-UE (Liu et al., ICLR 2024): neuron states from activation ⊙ gradient, scored by their coverage of the ID
# training states. Official code: BierOne/ood_coverage, openood/postprocessors/nac (coverage.py KMNC/Estimator,
# instr_state.py kl_grad, utils.py get_state_func/avg_pooling) and configs/postprocessors/nac/resnet/*.yml.
NAC_PAPER = ("Liu, Tian, Li, Ma & Wang, Neuron Activation Coverage: Rethinking Out-of-distribution Detection and "
             "Generalization, ICLR 2024")
# The official ResNet-18 hyper-parameters of each layer, from the head down (avgpool, layer3, layer2, layer1):
# the sigmoid's steepness α, the histogram's bins M and the count O at which a bin is fully covered.
NAC_HYPER = {10: ((100, 50, 50), (1000, 500, 100), (0.001, 50, 5), (0.001, 500, 100)),   # nac_cifar10.yml
             100: ((50, 50, 50), (10, 1000, 500), (1, 50, 500), (0.005, 50, 5))}         # nac_cifar100.yml


def nac_layers(model: nn.Module) -> tuple[str, ...]:
    """NAC-UE's layers, from the head down: the official CIFAR choice (ResNet-18: ``avgpool layer3 layer2
    layer1``, the pooled features and the outputs of the three stages before the last) mapped onto ours: the
    pooled features (``FEATURES``) and the outputs of every stage but the last (whose pooled output they are).
    ResNet-18: features, layer3, layer2, layer1; ResNet-20/32/56: features, layer2, layer1; WRN-40-2: features,
    block2, block1."""
    if isinstance(model, WideResNet):
        return FEATURES, "block2", "block1"
    if isinstance(model, (CifarResNet, ResNet18)):
        stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
        return FEATURES, *stages[-2::-1]
    raise ValueError(f"NAC-UE's layer choice is defined for the ResNets and WRN-40-2, not {type(model).__name__}")


def nac_hyper(num_classes: int, num_layers: int) -> tuple[tuple[float, int, int], ...]:
    """(α, M, O) of each of NAC-UE's layers, from the head down: the official CIFAR-100 values for a 100-class
    model, the CIFAR-10 ones otherwise (our choice; there are none for other data sets). ResNet-20 and WRN-40-2
    have three layers and take the first three."""
    return NAC_HYPER[100 if num_classes == 100 else 10][:num_layers]


def _nac_state(attribution: torch.Tensor, alpha: float) -> torch.Tensor:
    """The official ``sigmoid(o*g_kl)`` state, 1 / (1 + exp(−α·x)), of x = (pooled activation)·(pooled gradient)."""
    return 1 / (1 + torch.exp(-alpha * attribution))


class NacUE(Detector):
    """NAC-UE: L = KL(uniform ‖ softmax) up to a constant, Σ_k −(1/K) log softmax(f(x))_k (the official
    ``kl_grad``), dL/dz = softmax(z) − 1/K. For each neuron (channel) c of each layer (``nac_layers``), its state
    s_c = sigmoid(α · (Σ_s a_cs) · (Σ_s ∂L/∂a_cs)): the activation and its gradient each *summed* over the
    spatial positions (the official ``avg_pooling`` sums, "the denominator can be scaled by the sigmoid"), then
    multiplied. The states are this unit's per-sample output (the file's ``features``, one (N, C) array per
    layer); its score needs a fit on ID training images (``utils.coverage``: a histogram of M bins per neuron,
    coverage min(count/O, 1); score = mean over layers of the mean over neurons of the coverage of the sample's
    bin), which tracking makes from ``train.pkl``. Higher coverage means in-distribution (sign +1).
    From the pass alone (``gradient_scores``), ``layers`` and ``total`` hold each layer's mean state and their
    mean, summaries that tracking replaces by the coverage scores."""
    name = "nac_ue"
    paper = NAC_PAPER
    formula = "mean_l mean_c coverage_lc(bin of sigmoid(α·Σ_s a_c·Σ_s ∂KL(u‖p)/∂a_c)), fit on ID training images"
    rows = "kl_uniform"
    sign = +1
    fits_on_training = True

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.softmax(1) - 1 / logits.shape[1]).unsqueeze(0)

    def requests(self, last_layer: str) -> tuple:
        return ()

    def activations(self, model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return (("pooled_product", nac_layers(model)),)

    def reduce(self, results: list[dict[str, torch.Tensor]], logits: torch.Tensor) -> Scores:
        alphas = [alpha for alpha, _, _ in nac_hyper(logits.shape[1], len(results[0]))]
        states = {name: _nac_state(product[0], alpha) for (name, product), alpha in zip(results[0].items(), alphas)}
        layers = {name: state.mean(1) for name, state in states.items()}
        return Scores(layers, torch.stack(list(layers.values())).mean(0),
                      torch.full((len(logits),), -1, device=logits.device), features=states)

    def reference_states(self, model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's neuron states (C,) for one image, as the official ``assess_ood`` computes them: the layer
        outputs retained in the graph, ``kl_grad`` (``torch.autograd.grad`` of the summed loss) for each, both
        sum-pooled over space, ``sigmoid(o*g_kl)``."""
        names, kept, modules = nac_layers(model), {}, dict(model.named_modules())

        def keep(name: str):
            return lambda module, args, output: kept.__setitem__(name, output)

        handles = [modules[name].register_forward_hook(keep(name)) for name in names if name != FEATURES]
        handles.append(_head(model).register_forward_pre_hook(lambda module, args: kept.__setitem__(FEATURES, args[0])))
        try:
            outputs = model(image[None])
        finally:
            for handle in handles:
                handle.remove()
        targets = torch.ones_like(outputs) / outputs.shape[-1]
        loss = torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1)
        states = {}
        for i, (name, (alpha, _, _)) in enumerate(zip(names, nac_hyper(outputs.shape[1], len(names)))):
            grad = torch.autograd.grad(loss.sum(), kept[name], retain_graph=i < len(names) - 1)[0]
            pool = (lambda t: t.sum(dim=[2, 3])) if grad.dim() > 2 else (lambda t: t)
            states[name] = _nac_state(pool(kept[name].detach()) * pool(grad), alpha)[0]
        return states

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        layers = {name: state.mean().item() for name, state in self.reference_states(model, image).items()}
        return {**layers, "total": sum(layers.values()) / len(layers), "class": -1}


DETECTORS: dict[str, Detector] = {d.name: d for d in (
    CrossEntropy("min", "min_k ‖∇_W CE(f(x), k)‖₂ (the class with the smallest total norm)", sign=-1),
    CrossEntropy("max", "max_k ‖∇_W CE(f(x), k)‖₂ (the class with the largest total norm)", sign=+1),
    Predicted(), GradNorm(), ExGrad(), ODIN(), ConfoundingLabel(), GaiaA(), GaiaZ(), NacUE())}
CONFOUNDING = DETECTORS["original"]
TRACK_GRADIENT_SCORES = tuple(name for name, d in DETECTORS.items() if d.script == "track_gradient.py")


def get_detector(name: str | None, temperature: float = 1.0, odin_temperature: float = 1000.0,
                 epsilon: float = 0.0014) -> Detector:
    """The detector called ``name`` (None or ``original``: the confounding label); ``temperature`` for GradNorm,
    ``odin_temperature`` and ``epsilon`` for ODIN."""
    name = name or "original"
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    if name == "odin":
        return ODIN(odin_temperature, epsilon)
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

    That layer is a Linear map of the penultimate features h that gives the logits, so the per-sample gradient
    of a loss with dL/dlogits = δ is δhᵀ, of rank one: ‖δhᵀ‖₁ = ‖δ‖₁‖h‖₁ and ‖δhᵀ‖₂ = ‖δ‖₂‖h‖₂. A forward hook
    keeps h; each detector's rows δ come from ``output_gradients``; its ``reduce`` sees that layer only (its
    ``total`` is then that layer's value). TF32 is off unless ``tf32``, as in the engine. Returns the logits (B, K)
    and each detector's ``Scores`` by name."""
    (name, layer), = list(tracked_layers(model).items())[-1:]
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"--layers last needs a Linear last layer; {name} is a {type(layer).__name__}")
    kept = {}
    handle = layer.register_forward_hook(lambda module, args, output: kept.update(h=args[0], out=output))
    try:
        with eval_mode(model), tf32_mode(tf32), torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if kept.get("out") is not logits or kept["h"].dim() != 2:
        raise ValueError(f"--layers last needs {name} to map (B, D) features to the model's logits")
    h = kept["h"]
    h_norms = {1: h.abs().sum(1), 2: _l2(h.abs(), 1)}
    rows = {d.rows: d.output_gradients(logits) for d in detectors}  # each distinct set once, (R, B, K)
    scores = {}
    for d in detectors:
        delta = rows[d.rows]
        norms = [{name: (delta.abs().sum(2) if p == 1 else _l2(delta.abs(), 2)) * h_norms[p]}
                 for p, _ in d.requests(name)]
        scores[d.name] = d.reduce(norms, logits)
    return logits, scores
