"""The per-layer rules of the engine (``utils.per_sample``): for a layer y = W·a, one sample's weight gradient is
dL/dW = Σ_s g_s a_sᵀ over the output positions s; a rule, registered by layer type (``@norm_rule(nn.Linear)``),
turns the layer's inputs a and output gradients g of a whole batch into Σ |dL/dW|^p (p = 1 or 2) for every (row,
sample), without a loop over samples. Supporting a new layer type is one function here. Each rule picks its
cheapest exact path from the shapes, and works on chunks of samples that stay in cache (``in_chunks``).

A weight-standardised convolution (BiT's ``StdConv2d``) uses ŵ = (w − mean w)/σ per output channel; the gradient
tracked is that of the *raw* parameter w, what ``p.grad`` holds, through the standardisation (``std_conv2d_norms``)."""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.bit import STD_EPS, StdConv2d

NormRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
RULES: dict[type[nn.Module], NormRule] = {}


def norm_rule(layer_type: type[nn.Module]) -> Callable[[NormRule], NormRule]:
    """Register ``rule(module, inputs (B, ...), grads (R, B, ...), p) -> (R, B)``: Σ |dL/dW|^p per row and sample."""
    def register(rule: NormRule) -> NormRule:
        RULES[layer_type] = rule
        return rule
    return register


def _power_sums(per_row: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |·|^p of per-sample gradients (B, R, ...) for each (row, sample): (R, B)."""
    return (per_row.pow(2) if p == 2 else per_row.abs()).flatten(2).sum(2).T


def _explicit_gradients(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The per-sample gradients dL/dW = g aᵀ, (B, R, O, I), from g (R, B, O, S) and patches a (B, I, S)."""
    R, B, O, S = g.shape
    return (g.transpose(0, 1).reshape(B, R * O, S) @ a.transpose(1, 2)).reshape(B, R, O, -1)


def _explicit(g: torch.Tensor, a: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dW|^p, (R, B), from the per-sample gradients built explicitly: dL/dW = g aᵀ with g (R, B, O, S)
    and patches a (B, I, S); costs R·B·O·S·I."""
    return _power_sums(_explicit_gradients(g, a), p)


def _gram(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖dL/dW‖², (R, B), by the Gram identity ‖Σ_s g_s a_sᵀ‖² = Σ_{s,t} (a_s·a_t)(g_s·g_t); costs S²·(R·O + I)."""
    return ((g.transpose(2, 3) @ g) * (a.transpose(1, 2) @ a)).sum((2, 3))


def _gram_is_cheaper(R: int, O: int, S: int, fan_in: int) -> bool:
    return S * S * (R * O + fan_in) < R * S * O * fan_in


def _gram_elements(R: int, O: int, S: int, fan_in: int) -> int:
    """Elements a sample touches on the Gram path: its patches, the two S×S Grams (R + 1), its output gradients."""
    return fan_in * S + S * S * (R + 1) + R * O * S


def _explicit_elements(R: int, O: int, S: int, fan_in: int) -> int:
    """Elements a sample touches on an explicit path: its patches, its output gradients, its R gradients."""
    return fan_in * S + R * O * S + R * O * fan_in


RULE_CHUNK_ELEMENTS = 2 ** 21
"""The elements a rule's path touches at once (the samples' inputs and output gradients and what the path builds
from them): a batch is cut into chunks of samples of about this size (8 MiB of float32), so that the work stays in
cache and a larger ``--batch-size`` is not slower per image (measured in ``docs/speed.md``)."""


def in_chunks(path: NormRule, elements_per_sample: int, module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor,
              p: int) -> torch.Tensor:
    """``path`` on chunks of samples of at most ``RULE_CHUNK_ELEMENTS`` elements; samples are independent, so the
    result is the same as one call's."""
    chunk = max(1, RULE_CHUNK_ELEMENTS // elements_per_sample)
    if chunk >= grads.shape[1]:
        return path(module, inputs, grads, p)
    return torch.cat([path(module, inputs[i:i + chunk], grads[:, i:i + chunk], p)
                      for i in range(0, grads.shape[1], chunk)], 1)


def _over_positions(inputs: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's inputs (B, ..., I) and output gradients (R, B, ..., O) as a (B, I, S) and g (R, B, O, S)."""
    a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2)
    g = grads.reshape(*grads.shape[:2], -1, grads.shape[-1]).transpose(2, 3)
    return a, g


def _linear_gram(module: nn.Linear, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    a, g = _over_positions(inputs, grads)
    return _gram(g, a)


def _linear_explicit(module: nn.Linear, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    a, g = _over_positions(inputs, grads)
    return _explicit(g, a, p)


@norm_rule(nn.Linear)
def linear_norms(module: nn.Linear, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """y = W a over S positions (S = 1 for a plain (B, I) input): dL/dW = Σ_s g_s a_sᵀ. For S = 1 the gradient
    g aᵀ has rank one, so ‖·‖₁ = ‖g‖₁‖a‖₁ and ‖·‖₂² = ‖g‖₂²‖a‖₂² exactly; otherwise Gram identity (p = 2) or the
    explicit gradient, whichever is cheaper."""
    a, g = _over_positions(inputs, grads)
    R, _, O, S = g.shape
    I = a.shape[1]
    if S == 1:
        if p == 1:
            return g.abs().sum((2, 3)) * a.abs().sum((1, 2))
        return g.pow(2).sum((2, 3)) * a.pow(2).sum((1, 2))
    if p == 2 and _gram_is_cheaper(R, O, S, I):
        return in_chunks(_linear_gram, _gram_elements(R, O, S, I), module, inputs, grads, p)
    return in_chunks(_linear_explicit, _explicit_elements(R, O, S, I), module, inputs, grads, p)


def _patches(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """The convolution's input as patches a: (B, I, S), I = fan-in, S = output positions (``F.unfold``'s
    layout, built from a strided view: several times faster than ``F.unfold`` on the CPU)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    windows = F.pad(inputs, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw]  # (B, C, H', W', kh, kw)
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(inputs.shape[0], -1, windows.shape[2] * windows.shape[3])


def _conv_gram(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """‖dL/dW‖², (R, B), of a convolution by the Gram identity over its input patches: costs S²·(R·O + I)."""
    return _gram(grads.flatten(3), _patches(conv, inputs))


def _conv_input_gram(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """‖dL/dW‖², (R, B), of a convolution by the Gram identity with no patch matrix: a patch is the padded input x
    at the kernel's offsets δ, so a_s·a_t = Σ_δ x_{s+δ}·x_{t+δ}, the channel Gram K = xᵀx of the padded input (P×P
    positions) summed along the kernel's offsets, each a strided view of K. Costs C·P² + S²·(R·O + kh·kw): on small
    feature maps far less than the patches' Gram (S²·I) or the per-sample gradients (R·O·S·I)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    R, B, O, H, W = grads.shape
    x = F.pad(inputs, (pw, pw, ph, ph))
    height, width = x.shape[2:]
    x = x.flatten(2)
    K = x.transpose(1, 2) @ x  # (B, P, P), P = height·width padded positions
    row, column = height * width * width, width  # K's strides, in elements, for one step down at either end
    patch_products = K.as_strided((B, H, W, H, W, kh, kw),
                                  (K.stride(0), sh * row, sw * height * width, sh * column, sw, dh * (row + column),
                                   dw * (height * width + 1)))
    a = patch_products[..., 0, 0].clone()
    for i in range(kh):
        for j in range(kw):
            if i or j:
                a += patch_products[..., i, j]
    g = grads.flatten(3)
    return ((g.transpose(2, 3) @ g) * a.reshape(B, H * W, H * W)).sum((2, 3))


def _conv_explicit(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dW|^p, (R, B), of a convolution from its per-sample gradients, one batched product with the patch
    matrix."""
    return _explicit(grads.flatten(3), _patches(conv, inputs), p)


def _grouped_gradients(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The per-sample gradients (B, R, O, I) as one grouped convolution's weight gradient: the batch folded into
    the channels (B groups; group b pairs sample b's C input channels with the R·O output gradients of its rows),
    as torch.func's and Opacus' batching rules do."""
    R, B, O, H, W = grads.shape
    channels = inputs.shape[1]
    folded = torch.nn.grad.conv2d_weight(inputs.reshape(1, B * channels, *inputs.shape[2:]),
                                         (B * R * O, channels, *conv.kernel_size),
                                         grads.transpose(0, 1).reshape(1, B * R * O, H, W),
                                         conv.stride, conv.padding, conv.dilation, groups=B)
    return folded.reshape(B, R, O, -1)


def _grouped(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dW|^p, (R, B), from the per-sample gradients of one grouped convolution (``_grouped_gradients``). The
    convolution library's own kernel, with no patch matrix: the fastest path on large feature maps, slower than the
    patch matrix on small ones."""
    return _power_sums(_grouped_gradients(conv, inputs, grads), p)


def _conv_rank_one(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """One output position (S = 1: a head on a 1×1 map): dL/dW = g aᵀ has rank one, so ‖·‖₁ = ‖g‖₁‖a‖₁ and
    ‖·‖₂² = ‖g‖₂²‖a‖₂² exactly; costs R·O + I."""
    a, g = _patches(conv, inputs)[..., 0], grads.flatten(2)  # (B, I), (R, B, O)
    if p == 1:
        return g.abs().sum(2) * a.abs().sum(1)
    return g.pow(2).sum(2) * a.pow(2).sum(1)


COST_PER_MULTIPLY_ADD = {"gram": 1.0, "input_gram": 1.4, "explicit": 1.2, "grouped": 0.65}
"""The time of each Conv2d path per multiply-add, relative to the patches' Gram: measured on the 2-core CPU on the
feature maps of ResNet-20 and WRN-40-2 (R = 1 and 10; ``python bench/track_bench.py --arch ARCH --paths``,
``docs/speed.md``). ``grouped`` is that fast only for one row, a kernel larger than 1×1, at least 8 input channels
and output positions S ≥ 2 × the input channels; elsewhere it is not offered."""


def conv2d_paths(module: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int
                 ) -> dict[str, tuple[NormRule, float, int]]:
    """Every exact path of ``conv2d_norms`` for these shapes and p, by name: (path, estimated time = multiply-adds a
    sample × ``COST_PER_MULTIPLY_ADD``, elements a sample touches). The Gram identities give L2 norms only; a path
    the rule does not offer here (``grouped`` beyond its shapes) is estimated at infinity; ``rank_one`` is one only
    for a single output position."""
    R, _, O = grads.shape[:3]
    S, channels, kernel = math.prod(grads.shape[3:]), inputs.shape[1], math.prod(module.kernel_size)
    I, P = channels * kernel, math.prod(n + 2 * pad for n, pad in zip(inputs.shape[2:], module.padding))
    cost = COST_PER_MULTIPLY_ADD
    grouped_offered = R == 1 and kernel > 1 and channels >= 8 and S >= 2 * channels
    paths = {"explicit": (_conv_explicit, cost["explicit"] * R * O * S * I, _explicit_elements(R, O, S, I)),
             "grouped": (_grouped, cost["grouped"] * R * O * S * I if grouped_offered else math.inf,
                         inputs[0].numel() + R * O * S + R * O * I)}
    if S == 1:  # one output position: g aᵀ has rank one (exact only there)
        paths["rank_one"] = (_conv_rank_one, R * O + I, I + R * O)
    if p == 2:
        paths["gram"] = (_conv_gram, cost["gram"] * S * S * (R * O + I), _gram_elements(R, O, S, I))
        paths["input_gram"] = (_conv_input_gram, cost["input_gram"] * (channels * P * P + S * S * (R * O + kernel)),
                               channels * P + P * P + S * S * (R + 1) + R * O * S)
    return paths


@norm_rule(nn.Conv2d)
def conv2d_norms(module: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """dL/dW = Σ_s g_s a_sᵀ over the output positions s, with a_s the input patch (``_patches``). The path of least
    estimated time (``conv2d_paths``): for p = 2 the Gram identity, over the patches or over the padded input; the
    per-sample gradients of one grouped convolution (one row, large feature maps) or from the patch matrix. All are
    exact; each runs in chunks of samples that stay in cache (``in_chunks``)."""
    path, _, elements = min(conv2d_paths(module, inputs, grads, p).values(), key=lambda option: option[1])
    return in_chunks(path, elements, module, inputs, grads, p)


def standardisation(conv: StdConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """σ (O,) and the standardised weight ŵ (O, I) of a ``StdConv2d``: ŵ = (w − mean w)/σ, σ = √(var w + ε)."""
    weight = conv.weight.detach().flatten(1)
    var, mean = torch.var_mean(weight, dim=1, keepdim=True, unbiased=False)
    sigma = torch.sqrt(var + STD_EPS)
    return sigma[:, 0], (weight - mean) / sigma


def raw_weight_gradients(conv: StdConv2d, per_sample: torch.Tensor) -> torch.Tensor:
    """The gradients with respect to the raw weight w, (B, R, O, I), from those G with respect to ŵ: per output
    channel, dL/dw = (G − mean(G) − ŵ·(ŵ·G)/n)/σ over its n = I weights (the Jacobian of the standardisation, exact
    with its ε)."""
    sigma, w_hat = standardisation(conv)
    centred = per_sample - per_sample.mean(3, keepdim=True)
    along = (per_sample * w_hat).sum(3, keepdim=True) / w_hat.shape[1]
    return (centred - along * w_hat) / sigma[:, None]


def _std_explicit(conv: StdConv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    return _power_sums(raw_weight_gradients(conv, _explicit_gradients(grads.flatten(3), _patches(conv, inputs))), p)


def _std_grouped(conv: StdConv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    return _power_sums(raw_weight_gradients(conv, _grouped_gradients(conv, inputs, grads)), p)


@norm_rule(StdConv2d)
def std_conv2d_norms(module: StdConv2d, inputs: torch.Tensor, grads: torch.Tensor, p: int) -> torch.Tensor:
    """Σ |dL/dw|^p of a weight-standardised convolution's raw weight w: the per-sample gradients with respect to
    the standardised weight ŵ (a plain convolution's, built explicitly from the patch matrix or as one grouped
    convolution's weight gradient, whichever ``conv2d_paths`` estimates faster) mapped through the standardisation
    (``raw_weight_gradients``), which mixes each output channel's weights, so no Gram identity applies."""
    paths = conv2d_paths(module, inputs, grads, p)
    own = {"explicit": _std_explicit, "grouped": _std_grouped}
    name = min(own, key=lambda path: paths[path][1])
    return in_chunks(own[name], paths[name][2], module, inputs, grads, p)


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
