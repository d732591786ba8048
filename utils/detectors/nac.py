"""NAC-UE: neuron activation coverage of activation ⊙ gradient states, fit on in-distribution training images."""

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import CifarResNet, ResNet18
from models.wrn import WideResNet
from utils.activation_rules import FEATURES
from utils.detectors.base import (
    ActivationDetector,
    Scores,
)
from utils.per_sample import head_module

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


class NacUE(ActivationDetector):
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
        handles.append(head_module(model).register_forward_pre_hook(
            lambda module, args: kept.__setitem__(FEATURES, args[0])))
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
