"""Released checkpoints: the field's published CIFAR and ImageNet models turned into this project's checkpoints.

Each source saves a bare ``state_dict`` under its own key names and normalises images outside the model; our
models take [0, 1] images and normalise inside (``models.normalize.Normalize``). ``convert`` maps a source's
file onto one of our architectures so that, in eval mode, ``ours(x) == theirs((x - mean) / std)`` for every
[0, 1] image ``x``:

* ``oe`` — Outlier Exposure (Hendrycks et al., ICLR 2019; hendrycks/outlier-exposure) and energy_ood (Liu et al.,
  NeurIPS 2020; wetliu/energy_ood), which ship the same ``CIFAR/models/wrn.py``: WRN-40-2 with blocks under
  ``blockK.layer.J.``, projection shortcuts named ``convShortcut`` and the final BatchNorm at top level as
  ``bn1``; inputs normalised with mean (125.3, 123.0, 113.9)/255 and std (63.0, 62.1, 66.7)/255 for CIFAR-10
  and CIFAR-100 alike. Its ``avg_pool2d(out, 8)`` equals our global average pool on 32×32 inputs.
* ``openood`` — OpenOOD v1.5 (Zhang et al. 2023; Jingkang50/OpenOOD): ``ResNet18_32x32``, whose keys are ours;
  inputs normalised with its per-data-set constants (``openood/preprocessors/transform.py``).
* ``origin`` — the gradient-OOD code this project grew from (gengandrew/Open_OOD): ResNet-18 (``train.py``) and
  option-A ResNet-20/32 (``models/resnet.py``) with the classifier named ``linear``. Its ``supplementary/
  train_original.py`` saves a ``PrunedModel``: the network under ``model.`` and one ``mask_<name>`` buffer per
  pruned weight (dots written ``___``) that its forward multiplies into the weight. Its scripts define OE's
  constants but hand them only to the DenseNet; the ResNets see raw [0, 1] images.

* ``torchvision`` — torchvision's ImageNet-1K ResNet-50 (``torchvision.models.resnet50``), the OpenOOD v1.5
  leaderboard's model: a bare state dict under torchvision's own keys (ours: ``models.torchvision_resnet``),
  ImageNet mean/std, classes in sorted-wnid order (ImageFolder's). Which weights a file holds is read from its
  content: torchvision names each file by the first 8 hex digits of its sha256, ``resnet50-0676ba61.pth``
  (IMAGENET1K_V1: Resize(256) + CenterCrop(224)) and ``resnet50-11ad3fa6.pth`` (IMAGENET1K_V2: Resize(232) +
  CenterCrop(224)); any other file is V1 unless ``weights="IMAGENET1K_V2"``. A bare file name is also looked up in
  torch hub's cache (``torch.hub.get_dir()/checkpoints``, by default ``~/.cache/torch/hub/checkpoints/``).
* ``bit`` — GradNorm's and MOS's BiT-S ResNet-v2 (deeplearning-wisc/gradnorm_ood, ``resnetv2.py``):
  ``{"model": state dict}`` with ``module.`` prefixes, keys ours (``models.bit``); mean = std = 0.5, Resize((480,
  480)); the block units and width are read from the keys and shapes (R50x1, R101x1, or a reduced one); the head's
  classes follow MOS's ``imagenet2012_val_list.txt``, read from ``class_list`` and recorded in the meta.

Every source: ``module.`` prefixes (``nn.DataParallel``) and ``model.`` (``PrunedModel``) are stripped, masks are
multiplied in, BatchNorm ``num_batches_tracked`` counters that files written by PyTorch < 0.4.1 lack are set to
0 (eval mode does not read them), and the load is strict.
"""
import hashlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import models
from models.bit import BIT_R50_UNITS, BIT_R101_UNITS
from models.torchvision_resnet import RESNET50_LAYERS
from utils.data import NUM_CLASSES
from utils.data.imagenet import NORMALIZATION as IMAGENET_NORMALIZATION
from utils.data.imagenet import read_class_order
from utils.data.transforms import BIT, CIFAR, IMAGENET_V1, IMAGENET_V2, InputTransform
from utils.errors import UserError, unreadable

OE_NORMALIZATION = (tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)))
IDENTITY_NORMALIZATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
LOSSES = ("ce", "oe", "energy", "bce")  # cross-entropy, + OE's uniform term, + the energy margins, one-hot BCE


@dataclass(frozen=True)
class Source:
    """How one repository saves its models: key renames (regex → replacement, applied in order), the
    architectures it publishes (ours), the mean/std its code normalises each in-distribution data set with
    (``"*"``: any data set), the loss its released files were trained with, a line for ``--help``; the key of its
    classifier's weight, its input transform, ``infer`` (the architecture and its kwargs from the keys and shapes,
    where they vary) and whether its head's class order is read from MOS's list."""
    name: str
    repository: str
    renames: tuple[tuple[str, str], ...]
    archs: tuple[str, ...]
    normalization: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
    default_loss: str
    notes: str
    classifier: str = "fc.weight"
    transform: InputTransform = CIFAR
    infer: Callable[[dict[str, torch.Tensor]], tuple[str, dict]] | None = None
    class_list: bool = False


def _units(state: dict[str, torch.Tensor], pattern: str) -> tuple[int, ...]:
    """How many distinct units each numbered stage has: ``pattern`` matches a key with groups (stage, unit)."""
    units: dict[int, set[str]] = {}
    for key in state:
        match = re.match(pattern, key)
        if match:
            units.setdefault(int(match.group(1)), set()).add(match.group(2))
    return tuple(len(units[stage]) for stage in sorted(units))


def _infer_resnet50(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    layers = _units(state, r"^layer(\d+)\.(\d+)\.")
    return "resnet50", {} if layers == RESNET50_LAYERS else {"layers": list(layers)}


def _infer_bit(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    units = _units(state, r"^body\.block(\d+)\.unit(\d+)\.")
    width = state["root.conv.weight"].shape[0] if "root.conv.weight" in state else 64
    named = {BIT_R50_UNITS: "bit_r50x1", BIT_R101_UNITS: "bit_r101x1"}
    if units in named and width == 64:
        return named[units], {}
    return "bit_r50x1", {"block_units": list(units), "width": int(width)}  # a reduced BiT (tests)


SOURCES = {
    "oe": Source("oe", "hendrycks/outlier-exposure, wetliu/energy_ood",
                 renames=((r"^block(\d+)\.layer\.", r"block\1."), (r"\.convShortcut\.", ".shortcut."),
                          (r"^bn1\.", "bn.")),
                 archs=("wrn40_2",), normalization={"*": OE_NORMALIZATION}, default_loss="ce",
                 notes="OE's mean/std, (125.3, 123.0, 113.9)/255 and (63.0, 62.1, 66.7)/255, for every data set; "
                       "loss ce (--loss=oe for oe_tune files, energy for energy_ood's energy_ft)"),
    "openood": Source("openood", "Jingkang50/OpenOOD (v1.5)", renames=(), archs=("resnet18",),
                      normalization={"CIFAR-10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                                     "CIFAR-100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))},
                      default_loss="ce", notes="its own CIFAR-10 and CIFAR-100 mean/std; loss ce"),
    "origin": Source("origin", "gengandrew/Open_OOD", renames=((r"^linear\.", "fc."),),
                     archs=("resnet20", "resnet32", "resnet18"),
                     normalization={"*": IDENTITY_NORMALIZATION},
                     default_loss="bce",
                     notes="no normalisation: its scripts define OE's mean/std but pass them only to its DenseNet, "
                           "so its ResNets see [0, 1] images; loss bce for a PrunedModel file "
                           "(supplementary/train_original.py), ce otherwise (train.py)"),
    "torchvision": Source("torchvision", "pytorch/vision (torchvision.models.resnet50)", renames=(),
                          archs=("resnet50",), normalization={"ImageNet": IMAGENET_NORMALIZATION},
                          default_loss="ce", transform=IMAGENET_V1, infer=_infer_resnet50,
                          notes="ImageNet mean/std; Resize(256) + CenterCrop(224) for IMAGENET1K_V1 "
                                "(resnet50-0676ba61.pth), Resize(232) for V2 (resnet50-11ad3fa6.pth, or --weights); "
                                "a bare file name is also looked up in torch hub's cache; loss ce"),
    "bit": Source("bit", "deeplearning-wisc/gradnorm_ood (BiT-S, resnetv2.py)", renames=(),
                  archs=("bit_r50x1", "bit_r101x1"), normalization={"ImageNet": ((0.5,) * 3, (0.5,) * 3)},
                  default_loss="ce", classifier="head.conv.weight", transform=BIT, infer=_infer_bit, class_list=True,
                  notes="mean = std = 0.5, Resize((480, 480)); the head's class order from MOS's "
                        "imagenet2012_val_list.txt (--class-list); loss ce"),
}
TORCHVISION_WEIGHTS = {"0676ba61": "IMAGENET1K_V1", "11ad3fa6": "IMAGENET1K_V2"}  # sha256 prefix: torchvision's names
WEIGHT_TRANSFORMS = {"IMAGENET1K_V1": IMAGENET_V1, "IMAGENET1K_V2": IMAGENET_V2}


@dataclass
class Converted:
    """A source file mapped onto our architecture: the model (eval mode) and what the metadata records."""
    model: nn.Module
    arch: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loss: str
    sha256: str
    masks_applied: int
    arch_kwargs: dict = field(default_factory=dict)
    transform: InputTransform = CIFAR
    class_order: list[str] | None = None  # the wnid of each output, when the source's order is not sorted wnids
    weights: str | None = None            # torchvision's weights name


def source_normalization(source: Source, in_dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the source's own code normalises ``in_dataset`` images with."""
    if "*" in source.normalization:
        return source.normalization["*"]
    if in_dataset not in source.normalization:
        raise UserError(f"--source={source.name} publishes normalisation constants for "
                        f"{', '.join(source.normalization)} only, not {in_dataset}; pass --mean M M M --std S S S.")
    return source.normalization[in_dataset]


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors saved in ``path`` (a bare state dict, or one under ``"state_dict"`` or, as BiT's release,
    ``"model"``) and the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    content = path.read_bytes()
    remedy = "Download it again from the source's release (docs/released_checkpoints.md lists where)."
    try:
        obj = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, foreign file: many exception types
        raise unreadable(path, "PyTorch checkpoint", error, remedy) from None
    if isinstance(obj, dict) and "meta" in obj and "state_dict" in obj:
        raise UserError(f"{path} is already a checkpoint of these scripts (it holds 'state_dict' and 'meta'); "
                        f"copy it to <checkpoint-root>/<in-dataset>/<name>/last.pt instead of importing it.")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise unreadable(path, "state dict", f"it holds a {type(obj).__name__} that is not a dict of tensors",
                         remedy)
    return dict(obj), hashlib.sha256(content).hexdigest()


def strip_wrappers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop ``module.`` (DataParallel) and ``model.`` (PrunedModel) prefixes and multiply each ``mask_<a___b>``
    buffer into the weight ``a.b`` it masks. Returns the plain state dict and the number of masks applied."""
    plain = {re.sub(r"^(module\.)+", "", key): value for key, value in state.items()}
    masks = {key.removeprefix("mask_").replace("___", "."): value for key, value in plain.items()
             if key.startswith("mask_")}
    plain = {key.removeprefix("model."): value for key, value in plain.items() if not key.startswith("mask_")}
    for name, mask in masks.items():
        if name not in plain or plain[name].shape != mask.shape:
            raise UserError(f"the file holds a pruning mask of shape {tuple(mask.shape)} for {name!r}, but "
                            f"{'no such weight' if name not in plain else 'a weight of another shape'}.")
        plain[name] = plain[name] * mask.to(plain[name].dtype)
    return plain, len(masks)


def rename(state: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    """The source's key names written as ours."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in source.renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _mismatch(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """The modules with tensors only in the file, the modules with tensors only in the model, and the tensors
    whose shapes differ."""
    def modules(keys: list[str]) -> list[str]:
        return list(dict.fromkeys(key.rsplit(".", 1)[0] for key in keys))

    unexpected = modules([k for k in state if k not in reference])
    missing = modules([k for k in reference if k not in state and not k.endswith("num_batches_tracked")])
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(reference[k].shape)})"
              for k in state if k in reference and state[k].shape != reference[k].shape]
    return unexpected, missing, shapes


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def hub_file(path: str | Path) -> Path:
    """``path``, or, when it is a bare file name that does not exist here, the file of that name in torch hub's
    cache (``torch.hub.get_dir()/checkpoints``, where ``torchvision.models.resnet50(weights=...)`` downloads to)."""
    path = Path(path)
    if path.is_file() or path.parent != Path("."):
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / path.name
    return cached if cached.is_file() else path


def torchvision_weights(sha256: str, weights: str | None) -> str:
    """Which torchvision weights a file holds: ``weights`` if given, else read from the file's sha256 (torchvision
    names each file by its first 8 hex digits), else IMAGENET1K_V1."""
    if weights is not None:
        if weights not in WEIGHT_TRANSFORMS:
            raise UserError(f"--weights={weights}: torchvision's ResNet-50 weights are {', '.join(WEIGHT_TRANSFORMS)}.")
        return weights
    return TORCHVISION_WEIGHTS.get(sha256[:8], "IMAGENET1K_V1")


def convert(path: str | Path, source_name: str, in_dataset: str, arch: str | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            loss: str | None = None, weights: str | None = None, class_list: str | Path | None = None) -> Converted:
    """Read the ``source_name`` file ``path`` and return it as our model for ``in_dataset``.

    The architecture is ``arch`` or, among the source's, the one whose keys and shapes the file matches (read
    from them for ``torchvision`` and ``bit``); the number of classes is the classifier's output size;
    ``mean``/``std`` default to the source's. ``weights`` names torchvision's weights (default: from the file's
    sha256); ``class_list`` is MOS's ``imagenet2012_val_list.txt``, the class order of ``bit``'s head. A file that
    matches no architecture exactly is a ``UserError`` naming the unmatched keys.
    """
    source = SOURCES[source_name]
    path = hub_file(path) if source_name == "torchvision" else Path(path)
    state, sha256 = read_state_dict(path)
    state, masks_applied = strip_wrappers(state)
    state = rename(state, source)
    classifier = source.classifier
    if classifier not in state or state[classifier].dim() < 2:
        raise UserError(f"{path} has no classifier weight that --source={source_name} names "
                        f"{'linear.weight' if source_name == 'origin' else classifier}; its keys begin "
                        f"{_listing(list(state), 4)}. Is it a file of another source, or another architecture than "
                        f"{', '.join(source.archs)}?")
    num_classes = state[classifier].shape[0]
    if num_classes != NUM_CLASSES[in_dataset]:
        raise UserError(f"{path} classifies {num_classes} classes, but {in_dataset} has {NUM_CLASSES[in_dataset]}; "
                        f"pass the --in-dataset the file was trained on.")
    if (mean is None) != (std is None):
        raise UserError("pass --mean and --std together.")
    if mean is None:
        mean, std = source_normalization(source, in_dataset)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"--mean and --std take three values each, std positive; got {list(mean)} and {list(std)}.")

    class_order = None
    if source.class_list:
        if class_list is None:
            raise UserError(f"--source={source_name} needs MOS's imagenet2012_val_list.txt (--class-list): its head's "
                            "class order.")
        class_order = read_class_order(Path(class_list))
        if len(class_order) != num_classes:
            raise UserError(f"{class_list} names {len(class_order)} classes, but {path} classifies {num_classes}.")
    arch_kwargs = {}
    if source.infer is not None:
        inferred, arch_kwargs = source.infer(state)
        arch = arch or inferred
    chosen_weights = torchvision_weights(sha256, weights) if source_name == "torchvision" else None
    transform = WEIGHT_TRANSFORMS[chosen_weights] if chosen_weights else source.transform

    candidates = [arch] if arch else list(source.archs)
    reports = []
    for name in candidates:
        try:
            model = models.get_model(name, num_classes, mean, std, **arch_kwargs)
        except (TypeError, ValueError) as error:  # an inferred shape the architecture cannot be built with
            reports.append(f"as {name} with {arch_kwargs} — {error}")
            continue
        reference = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
        unexpected, missing, shapes = _mismatch(state, reference)
        if not (unexpected or missing or shapes):
            for key, value in reference.items():  # counters absent from files of PyTorch < 0.4.1
                state.setdefault(key, torch.zeros_like(value))
            model.load_state_dict({**model.state_dict(), **state}, strict=True)
            chosen_loss = loss or ("ce" if source_name == "origin" and not masks_applied else source.default_loss)
            return Converted(model.eval(), name, num_classes, tuple(mean), tuple(std), chosen_loss, sha256,
                             masks_applied, arch_kwargs, transform, class_order, chosen_weights)
        parts = [f"{label}: {_listing(keys)}" for label, keys in
                 (("modules in the file only", unexpected), ("modules missing from the file", missing),
                  ("shapes differ", shapes))
                 if keys]
        reports.append(f"as {name} — {'; '.join(parts)}")
    raise UserError(f"{path} does not map onto {' or '.join(candidates)} (--source={source_name}: its keys "
                    f"renamed from {source.repository}'s names to ours): {' | '.join(reports)}. Check --source "
                    f"and --model-arch (the source publishes {', '.join(source.archs)}); nothing was written.")
