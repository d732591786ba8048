"""What every loader shares: the label of unlabeled sets, arrays to tensors, augmentation, generated sets,
and the "file not found" message."""
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import DataNotFoundError, UserError

NO_LABEL = -1
"""The label of every OOD and auxiliary sample."""


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An HWC uint8 image as a CHW float32 tensor in [0, 1], the values ``transforms.ToTensor`` gives."""
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), dtype=np.float32)).div_(255)


def train_augmentation(flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The CIFAR training augmentation of Outlier Exposure and energy_ood on a CHW tensor:
    RandomCrop(32, padding=4) (zero padding) and, when ``flip``, RandomHorizontalFlip. (torchvision is
    imported where a transform is built: it costs seconds at start-up, and tracking needs none.)"""
    from torchvision import transforms

    steps = [transforms.RandomCrop(32, padding=4)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps)


class SeededImages(Dataset):
    """``num_samples`` generated images, label -1: image ``index`` is ``self.draw(rng)`` (a subclass's) from
    a generator seeded with ``(seed, index)`` alone, so no memory is held and the set is the same for any
    batch size, order or number of workers. ``augment``, if given, is applied to each image."""

    def __init__(self, name: str, num_samples: int, seed: int,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if num_samples < 1 or seed < 0:
            raise UserError(f"{name}: num_samples must be positive and seed non-negative, "
                            f"got num_samples={num_samples}, seed={seed}.")
        self.num_samples, self.seed, self.augment = num_samples, seed, augment

    def draw(self, rng: np.random.Generator) -> torch.Tensor:
        """One CHW float32 image in [0, 1]."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} images")
        image = self.draw(np.random.default_rng([self.seed, index]))
        return (self.augment(image) if self.augment else image), NO_LABEL


def not_found(name: str, path: Path, contents: str, source: str) -> DataNotFoundError:
    """The one-paragraph error for a missing data file: which data set, where it was looked for, what
    belongs there and where to get it."""
    return DataNotFoundError(f"{name}: {path} not found. {contents} {source}")
