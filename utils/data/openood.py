"""OpenOOD v1.5's benchmark as it ships: its image lists for CIFAR-10, CIFAR-100 and ImageNet-1K, read as they are.

OpenOOD (Zhang et al., "OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution Detection", 2023) defines
its sets by image lists, not folders. Its download unpacks, under the data root, to

    benchmark_imglist/<cifar10|cifar100|imagenet>/{train,val,test}_<set>.txt
    images_classic/      the CIFAR benchmarks' images, and Textures for ImageNet
    images_largescale/   ImageNet-1K's and its other OOD sets' images

A list line is ``<path relative to the image folder> <label>``: the label an int (-1 for OOD) or, as
OpenOOD's ``ImglistDataset`` also accepts, a Python dict literal, whose keys it stores as extras and whose
label it then sets to 0 (so does this reader). Images are read in list order, converted to RGB (MNIST's grey
images too, as OpenOOD does) and put through OpenOOD's test transform for the model, Resize + CenterCrop to
its input size: the model's ``InputTransform`` (CIFAR: Resize(32) + CenterCrop(32); torchvision's ResNet-50:
Resize(256) + CenterCrop(224)). Normalisation stays inside the model. OOD sets get label -1 whatever the
list says, as OpenOOD's evaluator sets them.

The sets and groups follow ``DATA_INFO`` of OpenOOD's ``openood/evaluation_api/datasets.py``: the ID test
set is ``test_<in>.txt``, the fit data ``train_<in>.txt``; ``val_tin.txt`` / ``val_openimage_o.txt`` (the
OOD validation split its parameter search uses) are not read here.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.data.common import NO_LABEL
from utils.data.transforms import InputTransform
from utils.errors import DataNotFoundError, UserError

NAME = "openood"
LISTS = Path("benchmark_imglist")
CLASSIC, LARGESCALE = "images_classic", "images_largescale"
SOURCE = ("Get OpenOOD v1.5's files as its repository says (https://github.com/Jingkang50/OpenOOD: "
          "scripts/download/download.sh, or data_setup in openood/evaluation_api/datasets.py): "
          "benchmark_imglist.zip and each set's zip, unpacked under the data root as benchmark_imglist/, "
          "images_classic/<set>/ and images_largescale/<set>/ (docs/openood.md).")

_CIFAR_FAR = ("mnist", "svhn", "texture", "places365")


@dataclass(frozen=True)
class Benchmark:
    """One of OpenOOD's benchmarks: its folder under ``benchmark_imglist/``, the ID set's image folder and
    its near- and far-OOD sets (``DATA_INFO``)."""
    folder: str
    images: str
    near: tuple[str, ...]
    far: tuple[str, ...]

    def image_folder(self, name: str) -> str:
        """The image folder of set ``name``: ImageNet's Textures lie in ``images_classic/``."""
        return CLASSIC if name == "textures" else self.images


# by this project's in-distribution name (ImageNet: the ImageNet issue's in-dataset)
BENCHMARKS = {
    "CIFAR-10": Benchmark("cifar10", CLASSIC, ("cifar100", "tin"), _CIFAR_FAR),
    "CIFAR-100": Benchmark("cifar100", CLASSIC, ("cifar10", "tin"), _CIFAR_FAR),
    "ImageNet": Benchmark("imagenet", LARGESCALE, ("ssb_hard", "ninco"), ("inaturalist", "textures", "openimage_o")),
}
OOD_NAMES = tuple(dict.fromkeys(name for b in BENCHMARKS.values() for name in (*b.near, *b.far)))


def benchmark(in_dataset: str) -> Benchmark:
    if in_dataset not in BENCHMARKS:
        raise UserError(f"OpenOOD v1.5 (--benchmark={NAME}) has no benchmark for {in_dataset}; its in-distribution "
                        f"sets here are {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[in_dataset]


def list_file(data_root: Path, in_dataset: str, split: str, name: str) -> Path:
    """``<data root>/benchmark_imglist/<benchmark>/<split>_<name>.txt``."""
    return Path(data_root) / LISTS / benchmark(in_dataset).folder / f"{split}_{name}.txt"


def locate(data_root: Path, in_dataset: str, split: str, name: str) -> Path:
    """The list file of ``name``; ``DataNotFoundError`` naming it when it is missing."""
    path = list_file(data_root, in_dataset, split, name)
    if not path.is_file():
        raise DataNotFoundError(f"OpenOOD {benchmark(in_dataset).folder}/{path.name}: {path} not found. It lists "
                                f"the images of {name!r}, one '<relative path> <label>' a line. {SOURCE}")
    return path


@dataclass(frozen=True)
class Entry:
    path: Path   # the image file
    label: int
    line: int    # 1-based, in the list file


def parse_label(text: str) -> int:
    """A list line's label as OpenOOD's ``ImglistDataset`` reads it: an int, or 0 for a dict of extras."""
    value = ast.literal_eval(text.strip())
    if isinstance(value, dict):
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{text.strip()!r} is neither an int nor a dict")
    return value


def read_list(path: Path, image_root: Path) -> list[Entry]:
    """The entries of list ``path`` in its order, images under ``image_root``; a ``UserError`` naming the list
    and line for a line that is not ``<relative path> <label>``, a ``DataNotFoundError`` for missing images."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.partition(" ")
        try:
            if name.startswith("/"):
                raise ValueError(f"the image path {name!r} is absolute; OpenOOD's paths are relative")
            entries.append(Entry(image_root / name, parse_label(label), number))
        except (ValueError, SyntaxError) as error:
            raise UserError(f"{path}, line {number}: {line!r} is not '<relative path> <label>' ({error}); the "
                            f"label is an int (-1 for OOD) or a dict, as in OpenOOD's lists. {SOURCE}") from None
    missing = [entry for entry in entries if not entry.path.is_file()]
    if missing:
        first = missing[0]
        raise DataNotFoundError(f"{path}, line {first.line}: image {first.path} not found ({len(missing)} of the "
                                f"{len(entries)} images the list names are missing under {image_root}). {SOURCE}")
    return entries


class ImageList(Dataset):
    """The images of one OpenOOD list in its order, RGB, through ``transform`` (the model's input transform);
    labels as listed, or -1 for every image with ``ood``."""

    def __init__(self, entries: list[Entry], transform: InputTransform, ood: bool):
        self.entries, self.ood, self.transform = entries, ood, transform.compose()
        self.labels = [NO_LABEL if ood else entry.label for entry in entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.entries[index].path) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def build(data_root: Path, in_dataset: str, split: str, name: str, transform: InputTransform) -> ImageList:
    """Set ``name`` of ``in_dataset``'s benchmark from ``<split>_<name>.txt``: the ID set (``name`` is the
    benchmark's own, e.g. ``cifar10``) with its labels, an OOD set with label -1."""
    bench = benchmark(in_dataset)
    path = locate(data_root, in_dataset, split, name)
    return ImageList(read_list(path, Path(data_root) / bench.image_folder(name)), transform,
                     ood=name != bench.folder)
