"""Every data set of the project by name: ``get_dataset(name, data_root, train)``.

Items are ``(image, label)``: a float32 tensor in [0, 1] (models normalise inside themselves) of shape
3x32x32, or for the sets of image files that of the model's input transform (``transform``; ImageNet's sets,
``utils.data.imagenet``), and an int, -1 for every OOD and auxiliary set. ``train=False`` is deterministic. Paths are
relative to the data root (default ``datasets``); ``datasets/README.md`` says what goes where.

Besides the names below, every digits open-set split ``digits-<known classes>`` is an in-distribution set
and ``heldout`` its near-OOD set; CIFAR-100 is near-OOD for CIFAR-10 and the reverse (``utils.data.splits``).
``ood_test_set`` reads an OOD set for a given in-distribution, ``ood_group`` names the near, far or all.

``--benchmark`` picks what the names mean: ``default``, the sets above; ``openood``, OpenOOD v1.5's image
lists (``utils.data.openood``: its own set names, ``test_<in>.txt`` as the ID test set, ``train_<in>.txt`` as
the fit data). ``resolve(name, in_dataset, benchmark)`` is the one place a tracked set's name is resolved to a
``SetSource`` (its spelling, its role and how it is built); ``ood_test_set``, ``ood_group`` and the tracking
script go through it.
"""
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from utils.data import bundled, cifar, folders, imagenet, openood, splits, svhn, synthetic, tinyimages
from utils.data.transforms import CIFAR, InputTransform
from utils.errors import DataNotFoundError, UserError

IN_DATASETS = ("CIFAR-10", "CIFAR-100", "digits", imagenet.NAME)
OOD_DATASETS = ("SVHN", "dtd", "places365", "LSUN", "LSUN_resize", "iSUN", "gaussian", "rademacher", "blobs")
IMAGENET_OOD_DATASETS = imagenet.OOD_SETS  # iNaturalist, SUN, Places: ImageNet's far-OOD sets with dtd
AUX_DATASETS = ("tinyimages", "random300k", "sample_photos")

OOD_GROUPS = ("near", "far", "all")
TRAIN_SPLIT = "train"  # the in-distribution training split without augmentation: what fits are made on
DEFAULT_BENCHMARK = "default"
BENCHMARKS = (DEFAULT_BENCHMARK, openood.NAME)


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


def check_dataset_name(name: str, benchmark: str = DEFAULT_BENCHMARK) -> str:
    """``name`` spelt as this project spells it, for a command-line argument: case, ``-`` and ``_`` do not
    matter (``Gaussian`` → ``gaussian``, ``cifar10`` → ``CIFAR-10``), a digits split's classes are sorted
    (``digits-210`` → ``digits-012``). Any other name is a ``UserError`` that lists the known ones. Under
    ``benchmark="openood"``: one of OpenOOD's OOD set names (``cifar100``, ``tin``, ``ssb_hard``, …), lower case."""
    if benchmark == openood.NAME:
        if name.lower() not in openood.OOD_NAMES:
            raise UserError(f"unknown OpenOOD set {name!r} (--benchmark={openood.NAME}). Its OOD sets: "
                            + "; ".join(f"{in_dataset} near {', '.join(b.near)}, far {', '.join(b.far)}"
                                        for in_dataset, b in openood.BENCHMARKS.items()) + ".")
        return name.lower()
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


@dataclass(frozen=True)
class SetSource:
    """What a tracked set's name means for a benchmark and an in-distribution: its spelling (the name its files
    are stored under), its role and how to build it."""
    name: str
    role: str  # "id" (the ID test set), "train" (the ID training split, no augmentation), "near" or "far" (OOD)
    build: Callable[[Path, InputTransform], Dataset]  # build(data_root, the model's input transform)
    locate: Callable[[Path], object] | None = None  # raises DataNotFoundError when files are missing

    def available(self, data_root: str | Path) -> bool:
        """Whether its files are present (checks that they exist, not their contents)."""
        try:
            if self.locate is not None:
                self.locate(Path(data_root))
        except DataNotFoundError:
            return False
        return True


def resolve(name: str, in_dataset: str, benchmark: str = DEFAULT_BENCHMARK,
            class_order: list[str] | None = None) -> SetSource:
    """The set ``name`` as tracked against ``in_dataset`` under ``benchmark``: ``TRAIN_SPLIT``, the ID test set
    (``in_dataset`` itself; under ``openood`` also its own name, e.g. ``cifar10``) or one of its near- and far-OOD
    sets (``ood_group``); any other name is a ``UserError`` that lists them. OOD sets have label -1. The sets
    are built through the model's input transform; ``class_order`` (the model's wnid of each class, from its
    checkpoint) labels ImageNet's ID sets."""
    if benchmark == openood.NAME:
        return _resolve_openood(name, in_dataset)
    if benchmark != DEFAULT_BENCHMARK:
        raise UserError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}.")
    locate = None if splits.is_digits_split(in_dataset) else _source(in_dataset).locate
    labels = {"class_order": class_order} if class_order is not None else {}
    if name == TRAIN_SPLIT:
        return SetSource(name, "train", lambda root, transform: get_dataset(
            in_dataset, root, train=True, transform=transform, augment=False, **labels), locate)
    if name == in_dataset:
        return SetSource(name, "id", lambda root, transform: get_dataset(in_dataset, root, transform=transform,
                                                                         **labels), locate)
    if name in ood_group("near", in_dataset):
        if name == splits.HELDOUT:
            return SetSource(name, "near", lambda root, transform: splits.heldout(in_dataset))
        return SetSource(name, "near", lambda root, transform: splits.AsOOD(get_dataset(name, root,
                                                                                          transform=transform)),
                         _source(name).locate)
    if name in ood_group("far", in_dataset):
        return SetSource(name, "far", lambda root, transform: get_dataset(name, root, transform=transform),
                         _source(name).locate)
    raise UserError(f"{name} is not an OOD set of {in_dataset}: its near-OOD sets are "
                    f"{', '.join(splits.near_ood(in_dataset)) or 'none'}, its far-OOD sets "
                    f"{', '.join(ood_group('far', in_dataset))}.")


def _resolve_openood(name: str, in_dataset: str) -> SetSource:
    bench = openood.benchmark(in_dataset)
    if name == TRAIN_SPLIT:
        split, spelt, role = "train", bench.folder, "train"
    elif name in (in_dataset, bench.folder):
        split, spelt, role = "test", bench.folder, "id"
    elif name in ood_group("all", in_dataset, openood.NAME):
        split, spelt, role = "test", name, "near" if name in ood_group("near", in_dataset, openood.NAME) else "far"
    else:
        raise UserError(f"{name!r} is not a set of OpenOOD's {bench.folder} benchmark (--benchmark={openood.NAME}): "
                        f"near-OOD {', '.join(bench.near)}, far-OOD {', '.join(bench.far)}; {TRAIN_SPLIT} for "
                        f"train_{bench.folder}.txt; the ID test set is test_{bench.folder}.txt.")
    return SetSource(in_dataset if role == "id" else name, role,
                     lambda root, transform: openood.build(root, in_dataset, split, spelt, transform),
                     lambda root: openood.locate(root, in_dataset, split, spelt))


def ood_test_set(name: str, in_dataset: str, data_root: str | Path = "datasets",
                 benchmark: str = DEFAULT_BENCHMARK, transform: InputTransform = CIFAR) -> Dataset:
    """OOD set ``name`` as tracked against ``in_dataset`` (``resolve``): by default one of ``OOD_DATASETS``;
    ``heldout``, the unknown classes' test images of a digits split; or the other CIFAR's test split for CIFAR
    (near-OOD); under ``openood`` one of OpenOOD's lists, through ``transform``. Every label is -1. Another
    pairing is a ``UserError``."""
    source = resolve(name, in_dataset, benchmark)
    if source.role not in ("near", "far"):
        raise UserError(f"{name} is the in-distribution set of {in_dataset}, not an OOD set.")
    return source.build(Path(data_root), transform)


def ood_group(group: str, in_dataset: str, benchmark: str = DEFAULT_BENCHMARK) -> tuple[str, ...]:
    """The OOD sets of ``group`` for ``in_dataset``: ``near`` (semantic shift: ``splits.near_ood``; under
    ``openood``, its benchmark's near-OOD lists), ``far`` (the other sets, ``OOD_DATASETS``; for ImageNet
    GradNorm's iNaturalist, SUN, Places and dtd; OpenOOD's far lists) or ``all`` (both), whether or not their data
    is present."""
    if benchmark == openood.NAME:
        near, far = openood.benchmark(in_dataset).near, openood.benchmark(in_dataset).far
    else:
        near = splits.near_ood(in_dataset)
        far = imagenet.FAR_OOD if in_dataset == imagenet.NAME else OOD_DATASETS
    return {"near": near, "far": far, "all": near + far}[group]


def dataset_available(name: str, data_root: str | Path = "datasets", in_dataset: str | None = None,
                      benchmark: str = DEFAULT_BENCHMARK) -> bool:
    """Whether the files of ``name`` are present (always true for generated and bundled sets); with
    ``in_dataset``, of ``name`` as ``resolve`` reads it under ``benchmark``. Checks that the files exist, not
    their contents."""
    if in_dataset is not None:
        return resolve(name, in_dataset, benchmark).available(data_root)
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
