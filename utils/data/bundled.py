"""Data that ships with scikit-learn, for the demo that runs with nothing downloaded.

* ``digits`` (in-distribution): ``sklearn.datasets.load_digits``, 1,797 8x8 handwritten digits with
  values 0..16 in 10 classes, scaled to [0, 1], upscaled to 32x32 bilinearly (``align_corners=False``) and
  repeated over 3 channels. A fixed stratified split (``train_test_split``, ``random_state=0``) keeps
  500 images for the test set and 1,297 for training.
* ``sample_photos`` (auxiliary outliers): 32x32 crops of the two photographs of
  ``sklearn.datasets.load_sample_images`` (china.jpg and flower.jpg, 427x640), each taken at a random
  position of a random one of 8 scales (short side 427 down to 38 pixels), seeded per index.
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from utils.data.common import SeededImages, to_tensor, train_augmentation

DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0
DIGITS_NORMALIZATION = ((0.3052, 0.3052, 0.3052), (0.3235, 0.3235, 0.3235))
"""Per-channel mean and std of the ``digits`` training split (a test recomputes them)."""

PHOTO_SCALES = tuple(2 ** (-k / 2) for k in range(8))


class Digits(Dataset):
    """The ``digits`` split as 3x32x32 tensors in [0, 1] with labels 0..9.

    ``train=True`` augments with RandomCrop(32, padding=4) only: digits are not mirror-symmetric
    (``augment=False``: the training images as they are).
    """

    def __init__(self, train: bool = False, augment: bool = True):
        from sklearn.datasets import load_digits  # imported where used: scikit-learn costs a second at start-up
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        train_index, test_index = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_TEST_SIZE,
                                                   stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
        index = np.sort(train_index if train else test_index)
        images = torch.from_numpy(digits.images[index].astype(np.float32) / 16).unsqueeze(1)
        self.images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        self.labels = digits.target[index].tolist()
        self.augment = train_augmentation(flip=False) if train and augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].expand(3, -1, -1).clone()
        return (self.augment(image) if self.augment else image), self.labels[index]


@functools.cache
def photo_pyramid() -> tuple[np.ndarray, ...]:
    """Each sample photograph at each of ``PHOTO_SCALES`` (PIL bilinear), HWC uint8."""
    from sklearn.datasets import load_sample_images

    pyramid = []
    for photo in load_sample_images().images:
        height, width = photo.shape[:2]
        for scale in PHOTO_SCALES:
            size = (round(width * scale), round(height * scale))
            pyramid.append(np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR)))
    return tuple(pyramid)


class SamplePhotoCrops(SeededImages):
    """``num_samples`` crops of scikit-learn's sample photographs, label -1; ``train=True`` adds random
    horizontal flips. The crop of an index depends only on ``(seed, index)``."""

    def __init__(self, num_samples: int = 10_000, seed: int = 0, train: bool = False):
        flip = None
        if train:
            from torchvision import transforms

            flip = transforms.RandomHorizontalFlip()
        super().__init__("sample_photos", num_samples, seed, flip)
        self.pyramid = photo_pyramid()

    def draw(self, rng: np.random.Generator) -> torch.Tensor:
        photo = self.pyramid[rng.integers(len(self.pyramid))]
        top, left = rng.integers(photo.shape[0] - 31), rng.integers(photo.shape[1] - 31)
        return to_tensor(photo[top:top + 32, left:left + 32])
