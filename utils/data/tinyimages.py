"""Auxiliary outliers stored as one big array on disk: 80 Million Tiny Images and its 300K replacement.

Both are memory-mapped on first access in each process (the map is never pickled), so every DataLoader
worker maps the file itself and a 227 GB file costs no memory up front.
"""
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.common import NO_LABEL, not_found, to_tensor, train_augmentation
from utils.errors import unreadable

TINY_DIR = Path("unlabeled_datasets/80M_Tiny_Images")
TINY_FILE = TINY_DIR / "tiny_images.bin"
CIFAR_INDICES_FILE = TINY_DIR / "80mn_cifar_idxs.txt"
RANDOM_300K_FILE = Path("unlabeled_datasets/300K_random_images.npy")
IMAGE_BYTES = 32 * 32 * 3
TINY_SOURCE = ("80M Tiny Images has been withdrawn by its authors; if you hold a copy (it was served as "
               "http://horatio.cs.nyu.edu/mit/tiny/data/tiny_images.bin), put it there; otherwise train with "
               "--aux-dataset random300k, Outlier Exposure's cleaned replacement.")
CIFAR_INDICES_SOURCE = "Outlier Exposure's and energy_ood's code (https://github.com/hendrycks/outlier-exposure)"
RANDOM_300K_SOURCE = ("Download it from https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy "
                      "(Outlier Exposure's 300K random images, de-duplicated against the usual test sets).")


class _MappedImages(Dataset):
    """Images in one file, mapped lazily by ``_open``; ``train`` adds OE's crop-and-flip augmentation."""

    def __init__(self, path: Path, train: bool):
        self.path = path
        self.augment = train_augmentation() if train else None
        self._array: np.ndarray | None = None

    def _open(self) -> np.ndarray:
        raise NotImplementedError

    def _image(self, index: int) -> np.ndarray:
        """Image ``index`` as HWC uint8."""
        raise NotImplementedError

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self._open()
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = to_tensor(self._image(index))
        return (self.augment(image) if self.augment else image), NO_LABEL


class TinyImages(_MappedImages):
    """80 Million Tiny Images as read by Outlier Exposure's ``tinyimages_80mn_loader.py``.

    The file is raw uint8, 3,072 bytes an image, each a 32x32x3 array in Fortran order; the number of
    images comes from the file size (79,302,017 in the real file). ``cifar_indices`` is OE's
    ``80mn_cifar_idxs.txt``: 1-based positions of the images that are also in CIFAR. OE re-draws a random
    image when it hits one; here they are skipped, so index ``i`` is the ``i``-th image that is not in
    CIFAR, found by binary search without an 80M-entry table.
    """

    def __init__(self, path: Path, cifar_indices: Path | None = None, train: bool = False):
        super().__init__(path, train)
        size = path.stat().st_size
        if size == 0 or size % IMAGE_BYTES:  # raw bytes: the size is all there is to check
            raise unreadable(path, "80M Tiny Images file", f"its size, {size} bytes, is not a positive multiple "
                             f"of {IMAGE_BYTES}, one 32x32x3 uint8 image",
                             "Copy it again from where you got it, or train with --aux-dataset random300k.")
        self.num_file_images = size // IMAGE_BYTES
        excluded = np.zeros(0, dtype=np.int64)
        if cifar_indices is not None:
            try:
                excluded = np.unique(np.loadtxt(cifar_indices, dtype=np.int64, ndmin=1)) - 1
            except ValueError as error:
                raise unreadable(cifar_indices, "list of image indices, one integer a line", error,
                                 f"Copy it again from {CIFAR_INDICES_SOURCE}.") from None
            excluded = excluded[(excluded >= 0) & (excluded < self.num_file_images)]
        self.num_excluded = len(excluded)
        # Kept images before each excluded one; index i is preceded by those excluded ones with value <= i.
        self._kept_before_excluded = excluded - np.arange(len(excluded))

    def __len__(self) -> int:
        return self.num_file_images - self.num_excluded

    def file_index(self, index: int) -> int:
        """The 0-based position in the file of the ``index``-th kept image."""
        return index + int(np.searchsorted(self._kept_before_excluded, index, side="right"))

    def _open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.num_file_images, IMAGE_BYTES))

    def _image(self, index: int) -> np.ndarray:
        return self.array[self.file_index(index)].reshape(32, 32, 3, order="F")


class Random300K(_MappedImages):
    """Outlier Exposure's ``300K_random_images.npy``: uint8 of shape (N, 32, 32, 3)."""

    def __init__(self, path: Path, train: bool = False):
        super().__init__(path, train)
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as error:  # a truncated or foreign file fails in many ways (Value-, EOF-, OSError …)
            raise unreadable(path, ".npy array", error, RANDOM_300K_SOURCE) from None
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (32, 32, 3):
            raise unreadable(path, "300K random images file", f"expected uint8 images of shape (N, 32, 32, 3), "
                             f"got {array.dtype} of shape {array.shape}", RANDOM_300K_SOURCE)
        self.num_images = len(array)

    def __len__(self) -> int:
        return self.num_images

    def _open(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def _image(self, index: int) -> np.ndarray:
        return self.array[index]


def locate_tiny(data_root: Path) -> Path:
    path = data_root / TINY_FILE
    if not path.is_file():
        raise not_found("tinyimages", path, "It is the raw 80 Million Tiny Images file (about 227 GB).",
                        TINY_SOURCE)
    return path


def build_tiny(data_root: Path, train: bool) -> TinyImages:
    """80M Tiny Images with CIFAR excluded; a warning, not an error, when the exclusion list is missing."""
    path, indices = locate_tiny(data_root), data_root / CIFAR_INDICES_FILE
    if not indices.is_file():
        warnings.warn(f"{indices} not found: the CIFAR images in 80M Tiny Images are NOT excluded from the "
                      f"outliers. The file ships with {CIFAR_INDICES_SOURCE}.", stacklevel=3)
        indices = None
    return TinyImages(path, indices, train)


def locate_random300k(data_root: Path) -> Path:
    path = data_root / RANDOM_300K_FILE
    if not path.is_file():
        raise not_found("random300k", path, "It is a uint8 array of shape (300000, 32, 32, 3).",
                        RANDOM_300K_SOURCE)
    return path


def build_random300k(data_root: Path, train: bool) -> Random300K:
    return Random300K(locate_random300k(data_root), train)
