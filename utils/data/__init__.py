"""Every data set of the project by name: ``get_dataset(name, data_root, train)``.

Items are ``(image, label)``: a float32 tensor in [0, 1] (models normalise inside themselves) of shape
3x32x32, or for the sets of image files that of the model's input transform (``transform``; ImageNet's sets,
``utils.data.imagenet``), and an int, -1 for every OOD and auxiliary set. ``train=False`` is deterministic. Paths are
relative to the data root (default ``datasets``); ``datasets/README.md`` says what goes where.

Besides the names below, every digits open-set split ``digits-<known classes>`` is an in-distribution set
and ``heldout`` its near-OOD set; CIFAR-100 is near-OOD for CIFAR-10 and the reverse (``utils.data.splits``).
``ood_test_set`` reads an OOD set for a given in-distribution, ``ood_group`` names the near, far or all.
"""
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from utils.data import bundled, cifar, folders, imagenet, splits, svhn, synthetic, tinyimages
from utils.data.transforms import CIFAR, InputTransform
from utils.errors import DataNotFoundError, UserError

IN_DATASETS = ("CIFAR-10", "CIFAR-100", "digits", imagenet.NAME)
OOD_DATASETS = ("SVHN", "dtd", "places365", "LSUN", "LSUN_resize", "iSUN", "gaussian", "rademacher", "blobs")
IMAGENET_OOD_DATASETS = imagenet.OOD_SETS  # iNaturalist, SUN, Places: ImageNet's far-OOD sets with dtd
AUX_DATASETS = ("tinyimages", "random300k", "sample_photos")

OOD_GROUPS = ("near", "far", "all")


class _WithSplits(dict):
    """A mapping by in-distribution name that also answers for every digits split, through ``value(split)``."""

    def __init__(self, items: dict, value: Callable[[str], object]):
        super().__init__(items)
        self.value = value

    def __missing__(self, name: str):
        if not splits.is_digits_split(name):
            raise KeyError(name)
        return self.value(name)


NUM_CLASSES = _WithSplits({"CIFAR-10": 10, "CIFAR-100": 100, "digits": 10, imagenet.NAME: imagenet.NUM_CLASSES},
                          lambda name: len(splits.known_classes(name)))
# (mean, std) per channel of the training images; a digits split keeps those of the whole digits training split
NORMALIZATION = _WithSplits({
    "CIFAR-10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR-100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": bundled.DIGITS_NORMALIZATION,
    imagenet.NAME: imagenet.NORMALIZATION,
}, lambda name: bundled.DIGITS_NORMALIZATION)


def _digits(data_root: Path, train: bool, *, augment: bool = True) -> Dataset:
    return bundled.Digits(train, augment)


def _sample_photos(data_root: Path, train: bool, *, num_samples: int = 10_000, seed: int = 0) -> Dataset:
    return bundled.SamplePhotoCrops(num_samples, seed, train)


def _synthetic(kind: str, data_root: Path, *, num_samples: int = 10_000, seed: int = 0) -> Dataset:
    return synthetic.Synthetic(kind, num_samples, seed)


def _folder(name: str, data_root: Path, *, transform: InputTransform = CIFAR) -> Dataset:
    return folders.ImageFiles(folders.folder_images(name, data_root), transform)


def _places(data_root: Path, *, transform: InputTransform = CIFAR) -> Dataset:
    return folders.ImageFiles(folders.places_images(data_root), transform)


@dataclass(frozen=True)
class _Source:
    # build(data_root, train, **options) for in-distribution and auxiliary sets, build(data_root, **options)
    # for OOD test sets; its keyword-only parameters are the options get_dataset accepts.
    build: Callable[..., Dataset]
    locate: Callable[[Path], object] | None = None  # raises DataNotFoundError when files are missing


_SOURCES: dict[str, _Source] = {
    "CIFAR-10": _Source(partial(cifar.build, "CIFAR-10"), partial(cifar.locate, "CIFAR-10")),
    "CIFAR-100": _Source(partial(cifar.build, "CIFAR-100"), partial(cifar.locate, "CIFAR-100")),
    "digits": _Source(_digits),
    "SVHN": _Source(svhn.build, svhn.locate),
    **{name: _Source(partial(_folder, name), partial(folders.folder_images, name)) for name in folders.FOLDERS},
    "places365": _Source(_places, folders.places_images),
    **{kind: _Source(partial(_synthetic, kind)) for kind in synthetic.GENERATORS},
    "tinyimages": _Source(tinyimages.build_tiny, tinyimages.locate_tiny),
    "random300k": _Source(tinyimages.build_random300k, tinyimages.locate_random300k),
    "sample_photos": _Source(_sample_photos),
    imagenet.NAME: _Source(imagenet.build, imagenet.locate),
    **{name: _Source(partial(imagenet.build_ood, name), partial(imagenet.ood_images, name))
       for name in IMAGENET_OOD_DATASETS},
}
assert set(_SOURCES) == set(IN_DATASETS + OOD_DATASETS + IMAGENET_OOD_DATASETS + AUX_DATASETS)


def _folded(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_BY_FOLDED = {_folded(name): name for name in _SOURCES}
assert len(_BY_FOLDED) == len(_SOURCES)


def check_dataset_name(name: str) -> str:
    """``name`` spelt as this project spells it, for a command-line argument: case, ``-`` and ``_`` do not
    matter (``Gaussian`` → ``gaussian``, ``cifar10`` → ``CIFAR-10``), a digits split's classes are sorted
    (``digits-210`` → ``digits-012``). Any other name is a ``UserError`` that lists the known ones."""
    if splits.is_digits_split(name):
        return splits.split_name(name)
    if name.lower() == splits.HELDOUT:
        return splits.HELDOUT
    if _folded(name) not in _BY_FOLDED:
        raise UserError(f"unknown data set {name!r}. Known: in-distribution {', '.join(IN_DATASETS)}; OOD "
                        f"{', '.join(OOD_DATASETS + IMAGENET_OOD_DATASETS)}; "
                        f"auxiliary {', '.join(AUX_DATASETS)}; a digits open-set split "
                        f"such as digits-012345 (in-distribution) with its near-OOD set {splits.HELDOUT}; "
                        "CIFAR-10 and CIFAR-100 are near-OOD sets of each other.")
    return _BY_FOLDED[_folded(name)]


def check_in_dataset(name: str) -> str:
    """``check_dataset_name`` for an in-distribution set (``IN_DATASETS`` or a digits split); a ``UserError``
    for any other name."""
    spelt = check_dataset_name(name)
    if spelt not in IN_DATASETS and not splits.is_digits_split(spelt):
        raise UserError(f"{name!r} is not an in-distribution data set: one of {', '.join(IN_DATASETS)} or a digits "
                        "open-set split such as digits-012345.")
    return spelt


def _source(name: str) -> _Source:
    """The source of ``name``, spelt exactly: file names follow it, so ``get_dataset`` does not respell."""
    if name not in _SOURCES:
        spelt = check_dataset_name(name)  # raises for an unknown name
        if spelt == splits.HELDOUT:
            raise UserError(f"{splits.HELDOUT} is the near-OOD set of a digits split; read it with "
                            "ood_test_set(name, in_dataset).")
        raise UserError(f"data set {name!r} is spelt {spelt!r}.")
    return _SOURCES[name]


def get_dataset(name: str, data_root: str | Path = "datasets", train: bool = False,
                transform: InputTransform | None = None, **options) -> Dataset:
    """The data set ``name`` (one of ``IN_DATASETS``, ``OOD_DATASETS``, ``AUX_DATASETS``) under ``data_root``.

    ``train`` picks the training split and its augmentation for in-distribution sets, and the augmentation
    for auxiliary sets; OOD sets are test sets only. Options: ``num_samples`` and ``seed`` for
    ``gaussian``, ``rademacher``, ``blobs`` and ``sample_photos``; ``augment=False`` for the
    in-distribution sets (their training split without augmentation, as gradient tracking reads it). A
    missing file raises ``DataNotFoundError`` (a ``UserError``) that says where the file belongs and where to get it.
    ``transform`` is the model's input transform (``utils.data.transforms``; None: the set's default), applied by
    the sets of image files; the sets stored or generated at 32×32 accept CIFAR's only. ``ImageNet`` also takes
    ``class_order``, the model's wnid of each class (labels follow it).
    """
    if splits.is_digits_split(name) and name == splits.split_name(name):
        return splits.digits_split(name, train, **_checked(name, options, ("augment",)))
    source = _source(name)
    accepted = [parameter.name for parameter in inspect.signature(source.build).parameters.values()
                if parameter.kind is parameter.KEYWORD_ONLY]
    options = _checked(name, options, accepted)
    if transform is not None and "transform" in accepted:
        options["transform"] = transform
    elif transform not in (None, CIFAR):
        raise UserError(f"{name} is stored or generated as 32x32 images; this model takes images through "
                        f"{transform} (its checkpoint's input transform). Track a set of image files instead.")
    if name in OOD_DATASETS + IMAGENET_OOD_DATASETS:
        if train:
            raise UserError(f"{name} is an OOD test set; it has no training split (train=True).")
        return source.build(Path(data_root), **options)
    return source.build(Path(data_root), train, **options)


def _checked(name: str, options: dict, accepted: list[str] | tuple[str, ...]) -> dict:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"{name} has no option {', '.join(unknown)}; its options: {', '.join(accepted) or 'none'}.")
    return options


def ood_test_set(name: str, in_dataset: str, data_root: str | Path = "datasets",
                 transform: InputTransform | None = None) -> Dataset:
    """OOD set ``name`` as tracked against ``in_dataset``: one of ``OOD_DATASETS`` or ``IMAGENET_OOD_DATASETS``;
    ``heldout``, the unknown classes' test images of a digits split; or the other CIFAR's test split for CIFAR
    (near-OOD). Every label is -1; ``transform`` is the model's (``get_dataset``). Another pairing is a
    ``UserError``."""
    if name in OOD_DATASETS + IMAGENET_OOD_DATASETS:
        return get_dataset(name, data_root, transform=transform)
    if name in splits.near_ood(in_dataset):
        return splits.heldout(in_dataset) if name == splits.HELDOUT else splits.AsOOD(get_dataset(name, data_root))
    raise UserError(f"{name} is not an OOD set of {in_dataset}: its near-OOD sets are "
                    f"{', '.join(splits.near_ood(in_dataset)) or 'none'}, its far-OOD sets {', '.join(OOD_DATASETS)}.")


def ood_group(group: str, in_dataset: str) -> tuple[str, ...]:
    """The OOD sets of ``group`` for ``in_dataset``: ``near`` (semantic shift: ``splits.near_ood``), ``far`` (the
    other sets: ``OOD_DATASETS``; for ImageNet GradNorm's iNaturalist, SUN, Places and dtd) or ``all`` (both),
    whether or not their data is present."""
    near = splits.near_ood(in_dataset)
    far = imagenet.FAR_OOD if in_dataset == imagenet.NAME else OOD_DATASETS
    return {"near": near, "far": far, "all": near + far}[group]


def dataset_available(name: str, data_root: str | Path = "datasets") -> bool:
    """Whether the files of ``name`` are present (always true for generated and bundled sets). Checks that
    the files exist, not their contents."""
    if name == splits.HELDOUT or splits.is_digits_split(name):
        return True
    locate = _source(name).locate
    if locate is None:
        return True
    try:
        locate(Path(data_root))
    except DataNotFoundError:
        return False
    return True
