"""The synthetic OOD test sets of Outlier Exposure (Hendrycks et al., ICLR 2019, ``test.py``), mapped from
OE's [-1, 1] to [0, 1].

* ``gaussian``: every value clip(N(0.5, 0.25^2), 0, 1) (OE: clip(N(0, 0.5^2), -1, 1)).
* ``rademacher``: every value 0 or 1 with probability 1/2 (OE: -1 or 1).
* ``blobs``: Bernoulli(0.7) values on a 32x32x3 array, Gaussian-blurred with sigma 1.5, values below 0.75
  set to 0. OE blurs with ``skimage.filters.gaussian(x, sigma=1.5, multichannel=False)``, i.e. over all
  three axes (the channel axis too) with ``mode="nearest"``; ``scipy.ndimage.gaussian_filter`` does the same.

Each image is drawn from its own generator seeded with ``(seed, index)``, so an image depends on nothing
but its index: no memory is held, and the set is the same for any batch size, order or number of workers.
"""
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from utils.data.common import NO_LABEL
from utils.errors import UserError



def gaussian(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(0.5, 0.25, size=(3, 32, 32)), 0, 1).astype(np.float32)


def rademacher(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2, size=(3, 32, 32)).astype(np.float32)


def blobs(rng: np.random.Generator) -> np.ndarray:
    image = ndimage.gaussian_filter(rng.binomial(1, 0.7, size=(32, 32, 3)).astype(np.float64),
                                    sigma=1.5, mode="nearest")
    image[image < 0.75] = 0.0
    return image.transpose(2, 0, 1).astype(np.float32)


GENERATORS = {"gaussian": gaussian, "rademacher": rademacher, "blobs": blobs}
"""Each draws one CHW float32 image in [0, 1] from a generator."""


class Synthetic(Dataset):
    """``num_samples`` images of synthetic set ``kind`` (a key of ``GENERATORS``), label -1 (OOD)."""

    def __init__(self, kind: str, num_samples: int = 10_000, seed: int = 0):
        if num_samples < 1 or seed < 0:
            raise UserError(f"{kind}: num_samples must be positive and seed non-negative, "
                            f"got num_samples={num_samples}, seed={seed}.")
        self.kind, self.num_samples, self.seed = kind, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} images")
        image = GENERATORS[self.kind](np.random.default_rng([self.seed, index]))
        return torch.from_numpy(image), NO_LABEL
