"""Near-OOD test sets: semantic shift, the in-distribution's own kind of image with classes it never saw.

* **Digits, open-set** (the protocol of Neal et al., ECCV 2018, on MNIST: some classes known, the others
  unknown, several random splits): the in-distribution ``digits-<known classes>``, e.g. ``digits-012345``,
  is the bundled digits restricted to those classes, labels remapped to 0..k-1 in increasing digit order;
  its near-OOD set ``heldout`` is the test images of the other classes (label -1). The split is in the
  name, so the files and checkpoints of different splits never mix. Names are canonical: the digits are
  written in increasing order (``digits-210`` is spelt ``digits-012``), 2 to 9 of them.
* **CIFAR** (OpenOOD v1.5's near-OOD pairing): CIFAR-100's test split is near-OOD for a CIFAR-10 model and
  CIFAR-10's for a CIFAR-100 model, read as OOD (label -1).
"""
import re

import torch
from torch.utils.data import Dataset

from utils.data.bundled import Digits
from utils.errors import UserError

DIGITS_PREFIX = "digits-"
HELDOUT = "heldout"
NEAR_OOD_PAIRS = {"CIFAR-10": ("CIFAR-100",), "CIFAR-100": ("CIFAR-10",)}
_SPLIT = re.compile(r"digits-(\d+)", re.IGNORECASE)


def is_digits_split(name: str) -> bool:
    return _SPLIT.fullmatch(name) is not None


def known_classes(name: str) -> tuple[int, ...]:
    """The known digit classes of split ``name`` (``digits-`` and 2 to 9 distinct digits), increasing; a
    ``UserError`` for anything else."""
    match = _SPLIT.fullmatch(name)
    digits = match.group(1) if match else ""
    if not match or len(set(digits)) != len(digits) or not 2 <= len(digits) <= 9:
        raise UserError(f"{name!r} is not a digits open-set split: write 'digits-' and 2 to 9 distinct known "
                        "classes, e.g. digits-012345 (the other classes' test images are the near-OOD set "
                        f"'{HELDOUT}').")
    return tuple(sorted(int(d) for d in digits))


def split_name(name: str) -> str:
    """The canonical spelling of split ``name``: ``digits-`` and its known classes in increasing order."""
    return DIGITS_PREFIX + "".join(map(str, known_classes(name)))


class ClassSubset(Dataset):
    """The items of ``dataset`` whose label is in ``classes``, labels remapped to their position in ``classes``
    (``ood=True``: the items whose label is not, with label -1). ``labels`` lists the source's labels."""

    def __init__(self, dataset: Dataset, labels: list[int], classes: tuple[int, ...], ood: bool = False):
        self.dataset, self.ood = dataset, ood
        self.index = [i for i, label in enumerate(labels) if (label in classes) != ood]
        self.remap = {label: k for k, label in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.index[index]]
        return image, -1 if self.ood else self.remap[label]


def digits_split(name: str, train: bool, augment: bool = True) -> ClassSubset:
    """Split ``name``'s in-distribution images: the digits split ``train`` (with its augmentation) of the known
    classes, labels 0..k-1."""
    digits = Digits(train, augment)
    return ClassSubset(digits, digits.labels, known_classes(name))


def heldout(in_dataset: str) -> ClassSubset:
    """The near-OOD set of split ``in_dataset``: the digits test images of the classes it does not know."""
    digits = Digits(train=False)
    return ClassSubset(digits, digits.labels, known_classes(in_dataset), ood=True)


class AsOOD(Dataset):
    """A labelled test set read as OOD: its images, every label -1."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index][0], -1


def near_ood(in_dataset: str) -> tuple[str, ...]:
    """The near-OOD sets of ``in_dataset``: ``heldout`` for a digits split, the other CIFAR for CIFAR, none
    for the full ``digits``."""
    return (HELDOUT,) if is_digits_split(in_dataset) else NEAR_OOD_PAIRS.get(in_dataset, ())
