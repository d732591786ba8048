"""The engine: per-sample weight-gradient norms (and activation gradients) of a whole batch, without a loop over
samples.

For a layer y = W·a (a Linear, or a convolution seen as a matrix product over unfolded input patches), one
sample's weight gradient is  dL/dW = Σ_s g_s a_sᵀ  over the output positions s, where a_s is the input
patch and g_s = dL/dy_s the output gradient there. Forward hooks keep every tracked layer's input and
output; one backward pass gives every output gradient g; a per-layer *rule* turns a and g into the norms
without a loop over samples — with one loss per image, in a hook on the layer's output as its gradient
arrives, so that no layer's gradient outlives its use. The network runs forward once per image: the R losses
tracked per image (one per class for ``min``/``max``) differ only in dL/dlogits, so their R output gradients
are back-propagated together as a batched vector-Jacobian product.

On a GPU TF32 is off while the engine tracks (``tf32_mode``): PyTorch runs convolutions in TF32 by default on
Ampere and later GPUs, which moves gradient norms by ~1e-3 relative.

A rule, registered by layer type (``@norm_rule(nn.Linear)``), computes Σ |dL/dW|^p for p = 1 or 2 of
every (row, sample): supporting a new layer type is one function. Each sample's gradient is that of a
batch of one when the model is in eval mode (``eval_mode``).

The same pass serves detectors that differentiate to *activations* (GAIA, NAC-UE): forward hooks keep the
outputs of the modules they name (or ``FEATURES``, the head's input), the one backward pass also yields the
gradient there, and an *activation rule*, registered by kind (``@activation_rule("mean")``), reduces it to
one value per (row, sample, channel). A row group may also seed the backward at the features instead of the
logits (GAIA back-propagates Σ of the pooled features): it is one more row of the same batched pass.
"""
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models import tracked_parameters
from utils.activation_rules import ACTIVATION_RULES, FEATURES
from utils.norm_rules import rule_for


def tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The module of each tracked weight (``models.tracked_parameters``), by parameter name, in model order."""
    modules = dict(model.named_modules())
    layers = {name: modules[name.rpartition(".")[0]] for name in tracked_parameters(model)}
    for name, module in layers.items():
        rule_for(name, module)
    return layers


def head_module(model: nn.Module) -> nn.Module:
    """The module of the last tracked weight: the head, whose input is the pooled (penultimate) features."""
    return list(tracked_layers(model).values())[-1]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with every module of ``model`` in eval mode (BatchNorm uses and never updates its
    running statistics, dropout is off), then give each module its previous mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def tf32_settings() -> list[tuple[object, str]]:
    """Where TF32 is set for CUDA matrix products and cuDNN convolutions, as (object, attribute): from torch 2.9
    on, their per-operation ``fp32_precision`` ("tf32" or "ieee"), which the kernels read and which overrides the
    older ``allow_tf32`` flags (reading those fails once the two APIs disagree); before, the flags."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "conv"):
        return [(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision")]
    return [(matmul, "allow_tf32"), (cudnn, "allow_tf32")]


@contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Run the block with TF32 on or off for CUDA matrix products and cuDNN convolutions (``tf32_settings``),
    then restore the previous settings; on the CPU they change nothing."""
    settings = tf32_settings()
    previous = [getattr(owner, name) for owner, name in settings]
    for (owner, name), setting in zip(settings, previous):
        setattr(owner, name, ("tf32" if enabled else "ieee") if isinstance(setting, str) else enabled)
    try:
        yield
    finally:
        for (owner, name), setting in zip(settings, previous):
            setattr(owner, name, setting)


def reference_norms(model: nn.Module, image: torch.Tensor,
                    losses: Callable[[torch.Tensor], list[torch.Tensor]], p: int = 2) -> torch.Tensor:
    """The definition the engine is held to, for one image (3, H, W) and a model in eval mode: a batch of one,
    ``zero_grad`` and ``loss.backward()`` for each loss of ``losses(logits)``, the p-norm of each tracked
    weight's ``.grad``. Returns (R, L): R losses, L tracked weights in model order. Slow by design."""
    weights = list(tracked_parameters(model).values())
    tracked = losses(model(image[None]))
    rows = []
    for i, loss in enumerate(tracked):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=i < len(tracked) - 1)
        rows.append(torch.stack([w.grad.norm() if p == 2 else w.grad.abs().sum() for w in weights]))
    return torch.stack(rows).detach()


NormRequest = tuple[int, int, frozenset[str] | None]
"""(group, p, layers): the p-norm (p = 1 or 2) of the weight gradients of the losses of row group ``group``,
for ``layers`` (None: every tracked layer)."""
ActivationRequest = tuple[int, str, tuple[str, ...]]
"""(group, kind, targets): activation rule ``kind`` of the gradients of row group ``group`` at each target's
output (``FEATURES``: the head's input)."""
RowGroup = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""dL/dlogits (R, B, K) of R per-sample losses; or (dL/dlogits, dL/dfeatures (R, B, 1), broadcast over the
features) for losses that also (or only) depend on the features directly."""


def weight_gradient_norms(model: nn.Module, x: torch.Tensor,
                          output_grads: Callable[[torch.Tensor], RowGroup | list[RowGroup]],
                          requests: tuple[NormRequest | ActivationRequest, ...] = ((0, 2, None),), tf32: bool = False
                          ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """One forward pass of ``x`` (B images) and one batched backward pass.

    ``output_grads(logits)`` gives dL/dlogits, (R, B, K), for R per-sample losses L, or a list of such row
    groups (``RowGroup``: a group may seed the features too), all back-propagated together. Returns the logits
    (B, K) and, for each request, a dict: for ``(group, p, layers)``, for each of those tracked weights W in
    model order, the p-norm ‖dL/dW‖_p of each loss of that group for every sample, (R_group, B); for
    ``(group, kind, targets)``, for each target, the activation rule's values (R_group, B, C). The backward
    pass carries each row scaled to unit length (the gradients are linear in it), so tiny gradients of
    confident predictions neither underflow nor lose precision. TF32 is off throughout unless ``tf32``.
    """
    with tf32_mode(tf32):
        return _gradients(model, x, output_grads, requests)


def _gradients(model: nn.Module, x: torch.Tensor, output_grads: Callable[[torch.Tensor], RowGroup | list[RowGroup]],
               requests: tuple[NormRequest | ActivationRequest, ...]
               ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    layers = tracked_layers(model)
    activation_targets = list(dict.fromkeys(t for _, kind, targets in requests if isinstance(kind, str)
                                            for t in targets))
    weight_targets = [name for name in layers if any(
        not isinstance(kind, str) and (wanted is None or name in wanted) for _, kind, wanted in requests)]
    image, logits, inputs, outputs, activations = _forward(model, x, layers, activation_targets)
    groups = output_grads(logits.detach())
    groups = [groups] if isinstance(groups, (torch.Tensor, tuple)) else groups
    groups = [(g, None) if isinstance(g, torch.Tensor) else g for g in groups]
    bounds = torch.tensor([0, *(len(g) for g, _ in groups)]).cumsum(0).tolist()
    seeds, scale = _unit_seeds(groups, activations.get(FEATURES))
    rules = {name: rule_for(name, layers[name]) for name in weight_targets}
    found = [{} for _ in requests]

    def weight_norms(name: str) -> Callable[[torch.Tensor], None]:
        def consume(grad: torch.Tensor) -> None:
            for values, (group, p, wanted) in zip(found, requests):
                if not isinstance(p, str) and (wanted is None or name in wanted):
                    rows = slice(bounds[group], bounds[group + 1])
                    power_sum = rules[name](layers[name], inputs[name], grad[rows], p)
                    values[name] = scale[rows] * (power_sum.sqrt() if p == 2 else power_sum)
        return consume

    def activation_values(target: str) -> Callable[[torch.Tensor], None]:
        def consume(grad: torch.Tensor) -> None:
            for values, (group, kind, wanted) in zip(found, requests):
                if isinstance(kind, str) and target in wanted:
                    rule, degree = ACTIVATION_RULES[kind]
                    rows = slice(bounds[group], bounds[group + 1])
                    values[target] = rule(activations[target].detach(), grad[rows]) * scale[rows].unsqueeze(2) ** degree
        return consume

    consumers = ([(outputs[name], weight_norms(name)) for name in weight_targets]
                 + [(activations[target], activation_values(target)) for target in activation_targets])
    _backward(seeds, [logits, activations.get(FEATURES)][:len(seeds)], image, consumers)
    ordered = [weight_targets if not isinstance(kind, str) else wanted for _, kind, wanted in requests]
    return logits.detach(), [{name: values[name] for name in order if name in values}
                             for values, order in zip(found, ordered)]


def _forward(model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], activation_targets: list[str]
             ) -> tuple[torch.Tensor, torch.Tensor, dict, dict, dict]:
    """One forward pass with hooks: the images as a leaf that requires grad (the backward pass runs to it), the
    logits, each tracked layer's input (detached) and output, and each activation target's output (``FEATURES``:
    the head's input)."""
    head, modules = list(layers)[-1], dict(model.named_modules())
    inputs, outputs, activations = {}, {}, {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in outputs:
                raise ValueError(f"{name} is used twice in one forward pass; its per-sample gradient is not tracked")
            inputs[name], outputs[name] = args[0].detach(), output
            if name == head:
                activations[FEATURES] = args[0]
        return hook

    def keep_activation(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in activations:
                raise ValueError(f"{name} is used twice in one forward pass; its output gradient is ambiguous")
            activations[name] = output
        return hook

    unknown = [t for t in activation_targets if t != FEATURES and t not in modules]
    if unknown:
        raise ValueError(f"no module named {', '.join(unknown)} in {type(model).__name__}")
    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    handles += [modules[t].register_forward_hook(keep_activation(t)) for t in activation_targets if t != FEATURES]
    try:
        with torch.enable_grad():
            image = x.detach().requires_grad_()
            logits = model(image)
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in layers if name not in outputs] + [t for t in activation_targets if t not in activations]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used in the forward pass")
    return image, logits, inputs, outputs, activations


def _unit_seeds(groups: list[tuple[torch.Tensor, torch.Tensor | None]], features: torch.Tensor | None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every row of every group as the seed of the backward pass, at the logits (R, B, K) and, where a group seeds
    them, at the features (R, B, D), each row scaled to unit length; and each row's scale (R, B), by which its
    gradients are to be multiplied."""
    seeds = [torch.cat([g for g, _ in groups])]
    if any(f is not None for _, f in groups):
        width = features.shape[1]
        seeds.append(torch.cat([g.new_zeros(*g.shape[:2], width) if f is None else f.expand(-1, -1, width)
                                for g, f in groups]))
    scale = torch.linalg.vector_norm(torch.cat(seeds, 2), dim=2).clamp_min(torch.finfo(seeds[0].dtype).tiny)  # (R, B)
    return [seed / scale.unsqueeze(2) for seed in seeds], scale


def _backward(seeds: list[torch.Tensor], sources: list[torch.Tensor], image: torch.Tensor,
              consumers: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]]) -> None:
    """Back-propagate the R rows of ``seeds`` from ``sources`` and hand each consumer the gradient (R, B, ...) at its
    tensor. One row: a plain backward pass to the images, each consumer called by a hook on its tensor as that
    gradient arrives, so that no layer's gradient outlives its use (holding every layer's gradient of a large
    batch at once made the pass twice as slow); several rows: one batched vector-Jacobian product to every
    consumer's tensor (``is_grads_batched``; a hook inside it would see one row at a time)."""
    tensors = [tensor for tensor, _ in consumers]
    if len(seeds[0]) > 1:
        for (_, consume), grad in zip(consumers, torch.autograd.grad(sources, tensors, seeds, is_grads_batched=True)):
            consume(grad)
        return
    arrived = set()

    def on_gradient(index: int, consume: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            consume(grad.unsqueeze(0))
            arrived.add(index)
        return hook

    handles = [tensor.register_hook(on_gradient(i, consume)) for i, (tensor, consume) in enumerate(consumers)]
    try:
        torch.autograd.grad(sources, image, [seed[0] for seed in seeds])
    finally:
        for handle in handles:
            handle.remove()
    if len(arrived) < len(consumers):
        raise ValueError("a tracked layer's output does not depend on the input images; its gradient is not tracked")
