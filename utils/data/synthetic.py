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

from utils.data.common import SeededImages


def gaussian(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(0.5, 0.25, size=(3, 32, 32)), 0, 1).astype(np.float32)


def rademacher(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2, size=(3, 32, 32)).astype(np.float32)


def blobs(rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage  # imported where used: scipy costs time at start-up

    image = ndimage.gaussian_filter(rng.binomial(1, 0.7, size=(32, 32, 3)).astype(np.float64),
                                    sigma=1.5, mode="nearest")
    image[image < 0.75] = 0.0
    return image.transpose(2, 0, 1).astype(np.float32)


GENERATORS = {"gaussian": gaussian, "rademacher": rademacher, "blobs": blobs}
"""Each draws one CHW float32 image in [0, 1] from a generator."""


class Synthetic(SeededImages):
    """``num_samples`` images of synthetic set ``kind`` (a key of ``GENERATORS``), label -1 (OOD)."""

    def __init__(self, kind: str, num_samples: int = 10_000, seed: int = 0):
        super().__init__(kind, num_samples, seed)
        self.kind = kind

    def draw(self, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(GENERATORS[self.kind](rng))
