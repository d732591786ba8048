"""OOD test sets stored as image files: Textures (dtd), Places365, LSUN-C, LSUN-R and iSUN.

Every image goes through the model's input transform as RGB (``utils.data.transforms``). For CIFAR models, the
default, that is Resize(32) + CenterCrop(32) + ToTensor, the test transform of ATOM's ``eval_ood_detection.py``
for all of these sets (for the 36x36 LSUN-C images the resize does the work and the crop is a no-op; the 32x32
LSUN-R and iSUN images pass unchanged).
"""
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.data.common import NO_LABEL, not_found
from utils.data.transforms import CIFAR, InputTransform
from utils.errors import DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
ODIN_LINKS = "the links in the ODIN repository, https://github.com/facebookresearch/odin"

# name: (folder under the data root, what belongs there, where to get it; {ood} is <data root>/ood_datasets)
FOLDERS = {
    "dtd": ("ood_datasets/dtd/images", "the Describable Textures images, <class>/*.jpg",
            "Download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and unpack it in {ood} "
            "(it unpacks to dtd/images/<class>/*.jpg)."),
    "LSUN": ("ood_datasets/LSUN", "LSUN-C's 36x36 images at any depth (LSUN.tar.gz unpacks to LSUN/test/*.jpg)",
             "Download LSUN.tar.gz from " + ODIN_LINKS + ", and unpack it in {ood}."),
    "LSUN_resize": ("ood_datasets/LSUN_resize",
                    "LSUN-R's 32x32 images at any depth (LSUN_resize.tar.gz unpacks to LSUN_resize/LSUN_resize/*.jpg)",
                    "Download LSUN_resize.tar.gz from " + ODIN_LINKS + ", and unpack it in {ood}."),
    "iSUN": ("ood_datasets/iSUN", "iSUN's 32x32 images at any depth (iSUN.tar.gz unpacks to iSUN/iSUN_patches/*.jpeg)",
             "Download iSUN.tar.gz from " + ODIN_LINKS + ", and unpack it in {ood}."),
}

PLACES_DIR = Path("ood_datasets/places365")
PLACES_IMAGES = PLACES_DIR / "test_subset"
PLACES_LIST = "places365_test_list.txt"
PLACES_SOURCE = ("Get the Places365 test images (test_256.tar) from http://places2.csail.mit.edu/download.html "
                 "and the list of the 10,000 sampled names from the original Gradients-for-OOD / ATOM repository "
                 "(https://github.com/jfc43/informative-outlier-mining, "
                 "datasets/ood_datasets/places365/test_subset/places365_test_list.txt).")

class ImageFiles(Dataset):
    """Image files in a fixed order, each as an RGB tensor through ``transform`` (the CIFAR models' Resize(32) +
    CenterCrop(32) by default) with label -1 (OOD)."""

    def __init__(self, paths: list[Path], transform: InputTransform = CIFAR):
        self.paths, self.transform = paths, transform.compose()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), NO_LABEL


def find_images(folder: Path) -> list[Path]:
    """Every image file at any depth below ``folder``, sorted by path."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def folder_images(name: str, data_root: Path) -> list[Path]:
    """The images of folder set ``name`` (a key of ``FOLDERS``); ``DataNotFoundError`` when none are there."""
    folder, contents, source = FOLDERS[name]
    path, source = data_root / folder, source.format(ood=data_root / "ood_datasets")
    if not path.is_dir():
        raise not_found(name, path, f"It should hold {contents}.", source)
    images = find_images(path)
    if not images:
        raise DataNotFoundError(f"{name}: {path} holds no images. It should hold {contents}. {source}")
    return images


def places_images(data_root: Path) -> list[Path]:
    """The Places365 test images named in the list file, in its order.

    The list is looked for in ``ood_datasets/places365/`` and, where the original README put it, in
    ``test_subset/``. A name is looked up directly in ``test_subset/`` and otherwise at any depth below it
    (``test_256.tar`` unpacks to ``test_256/``).
    """
    folder = data_root / PLACES_IMAGES
    candidates = [data_root / PLACES_DIR / PLACES_LIST, folder / PLACES_LIST]
    list_file = next((path for path in candidates if path.is_file()), None)
    if list_file is None:
        raise not_found("places365", candidates[0], f"It names the 10,000 test images, one per line "
                        f"(it is also accepted as {candidates[1]}).", PLACES_SOURCE)
    if not folder.is_dir():
        raise not_found("places365", folder, f"It should hold the images named in {list_file}.", PLACES_SOURCE)
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    paths = [folder / name for name in names]
    if not all(path.is_file() for path in paths):
        by_name = {path.name: path for path in find_images(folder)}
        paths = [path if path.is_file() else by_name.get(path.name, path) for path in paths]
    missing = [name for name, path in zip(names, paths) if not path.is_file()]
    if missing:
        raise DataNotFoundError(f"places365: {len(missing)} of the {len(names)} images named in {list_file} are "
                                f"missing from {folder} (e.g. {', '.join(missing[:3])}). {PLACES_SOURCE}")
    return paths
