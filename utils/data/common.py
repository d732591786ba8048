"""What every loader shares: the label of unlabeled sets, arrays to tensors, augmentation, and the
"file not found" message."""
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

from utils.errors import DataNotFoundError

NO_LABEL = -1
"""The label of every OOD and auxiliary sample."""


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An HWC uint8 image as a CHW float32 tensor in [0, 1], the values ``transforms.ToTensor`` gives."""
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), dtype=np.float32)).div_(255)


def train_augmentation(flip: bool = True) -> transforms.Compose:
    """The CIFAR training augmentation of Outlier Exposure and energy_ood on a CHW tensor:
    RandomCrop(32, padding=4) (zero padding) and, when ``flip``, RandomHorizontalFlip."""
    steps = [transforms.RandomCrop(32, padding=4)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps)


def not_found(name: str, path: Path, contents: str, source: str) -> DataNotFoundError:
    """The one-paragraph error for a missing data file: which data set, where it was looked for, what
    belongs there and where to get it."""
    return DataNotFoundError(f"{name}: {path} not found. {contents} {source}")
