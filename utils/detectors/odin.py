"""ODIN: the maximum softmax at temperature T of the image moved against its input gradient."""
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from utils.detectors.base import (
    Detector,
    Scores,
    cross_entropy_row,
)
from utils.per_sample import eval_mode, tf32_mode


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
        return cross_entropy_row(logits / self.temperature, logits.argmax(1)).unsqueeze(0) / self.temperature

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
