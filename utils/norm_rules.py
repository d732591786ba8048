"""The per-layer rules of the engine (``utils.per_sample``): for a layer y = W·a, one sample's weight gradient is
dL/dW = Σ_s g_s a_sᵀ over the output positions s; a rule, registered by layer type (``@norm_rule(nn.Linear)``),
turns the layer's inputs a and output gradients g of a whole batch into Σ |dL/dW|^p (p = 1 or 2) for every (row,
sample), without a loop over samples. Supporting a new layer type is one function here. Each rule picks its
cheapest exact path from the shapes, and works on chunks of samples that stay in cache."""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
RULES: dict[type[nn.Module], NormRule] = {}


def norm_rule(layer_type: type[nn.Module]) -> Callable[[NormRule], NormRule]:
    """Register ``rule(module, inputs (B, ...), grads (R, B, ...), p) -> (R, B)``: Σ |dL/dW|^p per row and sample."""
    def register(rule: NormRule) -> NormRule:
        RULES[layer_type] = rule
        return rule
    return register


def _explicit(g: torch.Tensor, a: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dW|^p, (R, B), from the per-sample gradients built explicitly: dL/dW = g aᵀ with g (R, B, O, S)
    and patches a (B, I, S); costs R·B·O·S·I."""
    R, B, O, S = g.shape
    per_row = g.transpose(0, 1).reshape(B, R * O, S) @ a.transpose(1, 2)  # (B, R·O, I)
    per_row = per_row.reshape(B, R, -1)
    return (per_row.pow(2) if p == 2 else per_row.abs()).sum(2).T


def _gram(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖dL/dW‖², (R, B), by the Gram identity ‖Σ_s g_s a_sᵀ‖² = Σ_{s,t} (a_s·a_t)(g_s·g_t); costs S²·(R·O + I)."""
    return ((g.transpose(2, 3) @ g) * (a.transpose(1, 2) @ a)).sum((2, 3))


def _gram_is_cheaper(g: torch.Tensor, fan_in: int) -> bool:
    R, _, O, S = g.shape
    return S * S * (R * O + fan_in) < R * S * O * fan_in


@norm_rule(nn.Linear)
def linear_norms(module: nn.Linear, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """y = W a over S positions (S = 1 for a plain (B, I) input): dL/dW = Σ_s g_s a_sᵀ. For S = 1 the gradient
    g aᵀ has rank one, so ‖·‖₁ = ‖g‖₁‖a‖₁ and ‖·‖₂² = ‖g‖₂²‖a‖₂² exactly; otherwise Gram identity (p = 2) or the
    explicit gradient, whichever is cheaper."""
    a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2)  # (B, I, S)
    g = grads.reshape(*grads.shape[:2], -1, grads.shape[-1]).transpose(2, 3)  # (R, B, O, S)
    if a.shape[2] == 1:
        if p == 1:
            return g.abs().sum((2, 3)) * a.abs().sum((1, 2))
        return g.pow(2).sum((2, 3)) * a.pow(2).sum((1, 2))
    if p == 2 and _gram_is_cheaper(g, a.shape[1]):
        return _gram(g, a)
    return _explicit(g, a, p)


def _patches(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """The convolution's input as patches a: (B, I, S), I = fan-in, S = output positions (``F.unfold``'s
    layout, built from a strided view: several times faster than ``F.unfold`` on the CPU)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    windows = F.pad(inputs, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw]  # (B, C, H', W', kh, kw)
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(inputs.shape[0], -1, windows.shape[2] * windows.shape[3])


def _shifted(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dW|^p, (R, B), of a stride-1 convolution, one kernel offset at a time: dW[:, :, i, j] is the
    product of the output gradients and the padded input shifted by that offset. Flattened, with the output
    rows padded to the input's padded width, each shift is a contiguous slice: no patch matrix is built."""
    (kh, kw), (dh, dw), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
    R, B, O, H, W = grads.shape
    width = W + dw * (kw - 1)  # of the padded input
    a = F.pad(inputs, (pw, pw, ph, ph + 1)).flatten(2)  # one more row: the last shift runs past the end
    g = F.pad(grads, (0, width - W)).transpose(0, 1).reshape(B, R * O, H * width)
    total = 0
    for i in range(kh):
        for j in range(kw):
            shift = i * dh * width + j * dw
            block = (g @ a[:, :, shift:shift + H * width].transpose(1, 2)).reshape(B, R, -1)  # (B, R, O·C)
            total = total + (block.pow(2) if p == 2 else block.abs()).sum(2)
    return total.T


def _grouped(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dW|^p, (R, B), from the per-sample gradients built as one grouped convolution's weight gradient: the
    batch folded into the channels (B groups; group b pairs sample b's C input channels with the R·O output
    gradients of its rows), as torch.func's and Opacus' batching rules do. The convolution library's own kernel:
    much faster than shifted slices on large feature maps with few channels, slower on small ones."""
    R, B, O, H, W = grads.shape
    channels = inputs.shape[1]
    folded = torch.nn.grad.conv2d_weight(inputs.reshape(1, B * channels, *inputs.shape[2:]),
                                         (B * R * O, channels, *conv.kernel_size),
                                         grads.transpose(0, 1).reshape(1, B * R * O, H, W),
                                         conv.stride, conv.padding, conv.dilation, groups=B)
    per_row = folded.reshape(B, R, -1)
    return (per_row.pow(2) if p == 2 else per_row.abs()).sum(2).T


GROUPED_MIN_POSITIONS_PER_CHANNEL = 16
"""``_grouped`` when the output positions S ≥ 16 × the input channels: measured on the 2-core CPU (R = 1 and 10,
B = 25 to 256), 2.5–3.5× faster than shifted slices at 32×32 with 16–32 channels, level at 16×16 with 64, 4×
slower at 8×8 with 128 (``docs/speed.md``)."""


@norm_rule(nn.Conv2d)
def conv2d_norms(module: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """dL/dW = Σ_s g_s a_sᵀ over the output positions s, with a_s the input patch (``_patches``). The cheapest
    exact path: for p = 2 the Gram identity when S²·(R·O + I) < R·S·O·I (small feature maps); on large feature
    maps with few channels the explicit per-sample gradients of one grouped convolution; otherwise the explicit
    gradient, from shifted slices of the input (stride 1) or from the patch matrix."""
    g = grads.flatten(3)  # (R, B, O, S)
    if p == 2 and _gram_is_cheaper(g, module.weight[0].numel()):
        return _gram(g, _patches(module, inputs))
    if g.shape[3] >= GROUPED_MIN_POSITIONS_PER_CHANNEL * inputs.shape[1]:
        return _grouped(module, inputs, grads, p)
    if module.stride == (1, 1):
        return _shifted(module, inputs, grads, p)
    return _explicit(g, _patches(module, inputs), p)


RULE_CHUNK_ELEMENTS = 2 ** 21
"""Per-sample gradient elements (rows × samples × weights) a rule works on at once: a larger batch is cut into
chunks of samples of about this size (8 MiB of float32), so that its explicit gradients stay in cache and a larger
``--batch-size`` is not slower per image (measured in ``docs/speed.md``)."""


def in_chunks(rule: NormRule, module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """``rule`` on chunks of samples of at most ``RULE_CHUNK_ELEMENTS`` gradient elements; samples are
    independent, so the result is the same as one call's."""
    chunk = max(1, RULE_CHUNK_ELEMENTS // (grads.shape[0] * module.weight.numel()))
    if chunk >= grads.shape[1]:
        return rule(module, inputs, grads, p)
    return torch.cat([rule(module, inputs[i:i + chunk], grads[:, i:i + chunk], p)
                      for i in range(0, grads.shape[1], chunk)], 1)


def rule_for(name: str, module: nn.Module) -> NormRule:
    rule = RULES.get(type(module))
    if isinstance(module, nn.Conv2d) and not (module.groups == 1 and module.padding_mode == "zeros"
                                              and not isinstance(module.padding, str)):
        rule = None
    if rule is None or not name.endswith(".weight"):
        raise ValueError(f"cannot track {name} ({type(module).__name__}): per-sample gradient norms are "
                         f"implemented for the weights of {', '.join(t.__name__ for t in RULES)} "
                         "(Conv2d: groups=1, zero padding); register a rule with utils.norm_rules.norm_rule")
    return rule
