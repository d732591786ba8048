"""Per-sample gradient norms and the files that hold them.

A gradients file is ``gradients/<in-dataset>/<name>/<score or "original">/<dataset>.pkl``, a pickled dict::

    {"version": 1,
     "model":   {"name", "arch", "in_dataset", "num_classes", "checkpoint", "epoch", "checkpoint_sha256"},
     "method":  "norm" | "original",   "score": "min" | "max" | "pred" | None,
     "dataset": "LSUN",                "num_samples": N,
     "layers":  {"conv1.weight": float32[N], ...},   # per-layer L2 norms, model order
     "total":   float32[N],                          # sqrt of the sum of squared layer norms
     "class":   int64[N],  "pred": int64[N],  "label": int64[N] (-1 for OOD),
     "msp": float32[N],  "energy": float32[N]}       # output-based baselines, same pass

It is written atomically and read back with a restricted unpickler that admits only builtin
containers and numpy arrays, so a file from elsewhere cannot run code.
"""
import io
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import tracked_parameters
from utils.errors import UserError
from utils.io import atomic_write

FORMAT_VERSION = 1
GRADIENT_ROOT = "gradients"
METHODS = ("norm", "original")
SCORES = ("min", "max", "pred")
MODEL_KEYS = ("name", "arch", "in_dataset", "num_classes", "checkpoint", "epoch")
# Written by the tracking scripts beside MODEL_KEYS, so that files of a model retrained under the same
# name and epoch are never mixed up with the old ones; not required of files from elsewhere.
CHECKPOINT_HASH_KEY = "checkpoint_sha256"
PER_SAMPLE_KEYS = {"total": np.float32, "class": np.int64, "pred": np.int64, "label": np.int64,
                   "msp": np.float32, "energy": np.float32}


def gradient_path(in_dataset: str, name: str, score: str | None, dataset: str,
                  root: str | Path = GRADIENT_ROOT) -> Path:
    """Where the gradients of model ``name`` on ``dataset`` live; ``score=None`` is the confounding-label method."""
    return Path(root) / in_dataset / name / (score or "original") / f"{dataset}.pkl"


class GradientFileError(UserError):
    """A gradients file that is missing, unreadable or not of the expected format."""


def check_record(record: dict, source: str = "record") -> dict:
    """Check a gradients record against the format; raise ``GradientFileError`` naming ``source``."""
    def fail(reason: str):
        raise GradientFileError(f"{source} is not a valid gradients file: {reason}")

    if not isinstance(record, dict):
        fail(f"it holds a {type(record).__name__}, not a dict")
    if record.get("version") != FORMAT_VERSION:
        fail(f"format version {record.get('version')!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("model", "method", "score", "dataset", "num_samples", "layers", *PER_SAMPLE_KEYS)
               if k not in record]
    if missing:
        fail(f"missing {', '.join(missing)}")
    if not isinstance(record["model"], dict) or any(k not in record["model"] for k in MODEL_KEYS):
        fail(f"'model' must be a dict with {', '.join(MODEL_KEYS)}")
    if record["method"] not in METHODS:
        fail(f"unknown method {record['method']!r}")
    if record["method"] == "norm" and record["score"] not in SCORES:
        fail(f"unknown score {record['score']!r}")
    n = record["num_samples"]
    if not isinstance(n, int) or n <= 0:
        fail(f"num_samples is {n!r}: it holds no samples")
    if not isinstance(record["layers"], dict) or not record["layers"]:
        fail("'layers' is empty")
    arrays = {**{f"layers[{k!r}]": v for k, v in record["layers"].items()},
              **{k: record[k] for k in PER_SAMPLE_KEYS}}
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.shape != (n,):
            fail(f"{key} must be an array of shape ({n},), got {getattr(value, 'shape', type(value).__name__)}")
        if value.dtype.kind not in "fiu":
            fail(f"{key} has dtype {value.dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            fail(f"{key} holds {int((~np.isfinite(value)).sum())} NaN or infinite value(s)")
    return record


def save_gradients(record: dict, path: str | Path) -> None:
    """Check ``record`` and pickle it to ``path`` atomically."""
    check_record(record, str(path))
    atomic_write(path, lambda f: pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL))


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits builtin containers and numpy arrays / dtypes / scalars; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # protocol 2 stores bytes via _codecs
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }
    _NUMPY_DTYPES = {"dtype", "Float32DType", "Float64DType", "Int64DType", "Int32DType", "UInt8DType", "BoolDType"}

    def find_class(self, module: str, name: str):
        allowed = (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name in self._NUMPY_DTYPES)
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a gradients file holds only "
                                         "builtin containers and numpy arrays")
        return super().find_class(module, name)


def load_gradients(path: str | Path) -> dict:
    """Read a gradients file with the restricted unpickler and check its format.

    A missing file, a pickle that names anything but builtin containers and numpy arrays (it is refused
    before anything runs), or a record of the wrong shape is a ``GradientFileError`` naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise GradientFileError(f"gradients file not found: {path}")
    try:
        record = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:  # a corrupt or foreign pickle fails in many ways (Overflow-, Memory-, LookupError …)
        raise GradientFileError(f"{path} is not a readable gradients file: {error}") from None
    return check_record(record, str(path))


# --- The engine: per-sample gradient norms of a whole batch at once -------------------------------------
#
# For a layer y = W·a (a Linear, or a convolution seen as a matrix product over unfolded input patches),
# one sample's weight gradient is  dL/dW = Σ_s g_s a_sᵀ  over the output positions s, where a_s is the
# input patch and g_s = dL/dy_s the output gradient there. Forward hooks keep every tracked layer's input
# and output; one backward pass gives every output gradient g; the norms follow from a and g without a
# loop over samples. The network runs forward once per image: the R losses tracked per image (one per
# class for ``min``/``max``) differ only in dL/dlogits, so their R output gradients are back-propagated
# together as a batched vector-Jacobian product.


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


def output_gradients(logits: torch.Tensor, score: str | None) -> torch.Tensor:
    """dL/dlogits for the per-sample losses tracked with ``score``: shape (R, B, K) for logits (B, K).

    * ``min``, ``max``: R = K; row k is the gradient of the cross-entropy with label k, softmax(z) − e_k.
    * ``pred``: R = 1; the cross-entropy with the predicted label.
    * ``None`` (the confounding label): R = 1; the gradient of ``BCEWithLogitsLoss(z, 1)`` averaged over the
      K classes, (sigmoid(z) − 1) / K.

    Computed without cancellation: p_k − 1 as −Σ_{j≠k} p_j and sigmoid(z) − 1 as −sigmoid(−z). (Autograd's
    softmax(z) − e_k rounds p_k − 1 to 0 once p_k is within float precision of 1, a confident prediction.)
    """
    num_classes = logits.shape[1]
    if score is None:
        return (-torch.sigmoid(-logits) / num_classes).unsqueeze(0)
    probs = logits.softmax(1)
    if score == "pred":
        labels = F.one_hot(logits.argmax(1), num_classes).to(probs.dtype).unsqueeze(0)  # (1, B, K)
    elif score in ("min", "max"):
        labels = torch.eye(num_classes, dtype=probs.dtype, device=probs.device).unsqueeze(1)  # (K, 1, K)
    else:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORES)} or None")
    others = probs * (1 - labels)  # softmax(z) with the label's entry zeroed
    return others - labels * others.sum(2, keepdim=True)


def rows_per_sample(score: str | None, num_classes: int) -> int:
    """R: how many gradients are back-propagated per image (what ``--batch-size`` counts)."""
    return num_classes if score in ("min", "max") else 1


def _tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The module of each tracked weight, by parameter name; each must be a Linear or a plain Conv2d."""
    modules = dict(model.named_modules())
    layers = {}
    for name in tracked_parameters(model):
        module_name, _, attribute = name.rpartition(".")
        module = modules[module_name]
        plain_conv = (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
                      and not isinstance(module.padding, str))
        if attribute != "weight" or not (isinstance(module, nn.Linear) or plain_conv):
            raise ValueError(f"cannot track {name} ({type(module).__name__}): per-sample gradient norms are "
                             "implemented for the weights of nn.Linear and nn.Conv2d (groups=1, zero padding)")
        layers[name] = module
    return layers


def _patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as patches a: (B, I, S), I = fan-in, S = output positions (``F.unfold``'s layout,
    built from a strided view: several times faster than ``F.unfold`` on the CPU)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2)
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = module.kernel_size, module.dilation, module.padding, module.stride
    windows = F.pad(inputs, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw]  # (B, C, H', W', kh, kw)
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(inputs.shape[0], -1, windows.shape[2] * windows.shape[3])


def _positions_last(module: nn.Module, grads: torch.Tensor) -> torch.Tensor:
    """Output gradients (R, B, O, ...) of a conv or (R, B, ..., O) of a Linear as g: (R, B, O, S)."""
    if isinstance(module, nn.Linear):
        return grads.reshape(*grads.shape[:2], -1, grads.shape[-1]).transpose(2, 3)
    return grads.flatten(3)


def _shifted_sq_norms(conv: nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """‖dL/dW‖², (R, B), of a stride-1 convolution, one kernel offset at a time: dW[:, :, kh, kw] is the
    product of the output gradients and the padded input shifted by that offset. Flattened, with the output
    rows padded to the input's padded width, each shift is a contiguous slice: no patch matrix is built."""
    (kh, kw), (dh, dw), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
    R, B, O, H, W = grads.shape
    width = W + dw * (kw - 1)  # of the padded input
    a = F.pad(inputs, (pw, pw, ph, ph + 1)).flatten(2)  # one more row: the last shift runs past the end
    g = F.pad(grads, (0, width - W)).transpose(0, 1).reshape(B, R * O, H * width)
    sq_norms = 0
    for i in range(kh):
        for j in range(kw):
            shift = i * dh * width + j * dw
            per_row = g @ a[:, :, shift:shift + H * width].transpose(1, 2)  # (B, R·O, C)
            sq_norms = sq_norms + per_row.reshape(B, R, -1).pow(2).sum(2)
    return sq_norms.T


def _sq_norms(module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """‖dL/dW‖², (R, B), of a Linear or Conv2d, from its inputs (B, ...) and output gradients (R, B, ...).

    With patches a (B, I, S) and g (R, B, O, S), dL/dW = Σ_s g_s a_sᵀ: build each (O, I) gradient
    (∝ R·S·O·I), or use the Gram identity ‖Σ_s g_s a_sᵀ‖² = Σ_{s,t} (a_s·a_t)(g_s·g_t)  (∝ S²·(R·O + I);
    for a Linear, S = 1: ‖g‖²·‖a‖²), whichever is cheaper.
    """
    g = _positions_last(module, grads)
    (R, B, O, S), I = g.shape, module.weight[0].numel()
    if S * S * (R * O + I) < R * S * O * I:
        a = _patches(module, inputs)
        return ((g.transpose(2, 3) @ g) * (a.transpose(1, 2) @ a)).sum((2, 3))
    if isinstance(module, nn.Conv2d) and module.stride == (1, 1):
        return _shifted_sq_norms(module, inputs, grads)
    per_row = g.transpose(0, 1).reshape(B, R * O, S) @ _patches(module, inputs).transpose(1, 2)  # (B, R·O, I)
    return per_row.reshape(B, R, O * I).pow(2).sum(2).T


def weight_gradient_norms(model: nn.Module, x: torch.Tensor,
                          output_grads: Callable[[torch.Tensor], torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass of ``x`` (B images) and one batched backward pass.

    ``output_grads(logits)`` gives dL/dlogits, (R, B, K), for R per-sample losses L. Returns the logits
    (B, K) and, for each tracked weight W in model order, the L2 norm ‖dL/dW‖ of every loss of every
    sample: (R, B). Each sample's gradient is that of a batch of one when the model is in eval mode (see
    ``eval_mode``). The backward pass carries each dL/dlogits scaled to unit length (the gradients are
    linear in it), so tiny gradients of confident predictions neither underflow nor lose precision.
    """
    layers = _tracked_layers(model)
    inputs, outputs = {}, {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in outputs:
                raise ValueError(f"{name} is used twice in one forward pass; its per-sample gradient is not tracked")
            inputs[name], outputs[name] = args[0].detach(), output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in layers if name not in outputs]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used in the forward pass")
    cotangents = output_grads(logits.detach())
    scale = torch.linalg.vector_norm(cotangents, dim=2).clamp_min(torch.finfo(cotangents.dtype).tiny)  # (R, B)
    unit = cotangents / scale.unsqueeze(2)
    targets = [outputs[name] for name in layers]
    if len(unit) == 1:  # one loss per sample: a plain backward pass, no vmap over the losses
        grads = [grad.unsqueeze(0) for grad in torch.autograd.grad(logits, targets, unit[0])]
    else:
        grads = torch.autograd.grad(logits, targets, unit, is_grads_batched=True)
    norms = {name: scale * _sq_norms(module, inputs[name], grad).sqrt()
             for (name, module), grad in zip(layers.items(), grads)}
    return logits.detach(), norms


def _l2(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The L2 norm along ``dim``, scaled by the largest entry first so that tiny values do not underflow."""
    largest = values.amax(dim, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return largest.squeeze(dim) * (values / largest).pow(2).sum(dim).sqrt()


@dataclass
class GradientNorms:
    """The tracked gradient of each sample of a batch of B."""
    layers: dict[str, torch.Tensor]  # per tracked weight, model order: its L2 norm, (B,)
    total: torch.Tensor              # the L2 norm over all tracked weights together, (B,)
    chosen: torch.Tensor             # the label of the tracked loss, (B,) int64; -1 for the confounding label
    logits: torch.Tensor             # (B, K), from the same forward pass


def gradient_norms(model: nn.Module, x: torch.Tensor, score: str | None) -> GradientNorms:
    """Per-sample gradient norms of the tracked weights of ``model`` on images ``x`` (B, 3, H, W).

    ``score`` ``min``/``max``: of the K cross-entropy gradients (one per label), the one whose norm over
    all tracked weights together is smallest/largest; ``pred``: the cross-entropy gradient for the predicted
    label; ``None``: the gradient of ``BCEWithLogitsLoss(f(x), 1)`` against the confounding label (all
    classes on, mean over classes). The model runs in eval mode; its modes are restored afterwards.
    """
    with eval_mode(model):
        logits, norms = weight_gradient_norms(model, x, lambda z: output_gradients(z, score))
    total = _l2(torch.stack(list(norms.values())), dim=0)  # (R, B)
    if score == "min":
        row = total.argmin(0)
    elif score == "max":
        row = total.argmax(0)
    else:
        row = torch.zeros(len(x), dtype=torch.long, device=logits.device)

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values.gather(0, row.unsqueeze(0)).squeeze(0)

    chosen = {"min": row, "max": row, "pred": logits.argmax(1)}.get(score, torch.full_like(row, -1))
    return GradientNorms({name: pick(v) for name, v in norms.items()}, pick(total), chosen, logits)
