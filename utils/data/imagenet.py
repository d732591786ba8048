"""ImageNet-1K and its OOD sets, as GradNorm (Huang et al., NeurIPS 2021) and MOS (Huang & Li, CVPR 2021) read them.

* ``ImageNet`` — the 50,000 validation images, ``imagenet/val/<wnid>/*.JPEG``, in ImageFolder's order (classes by
  sorted wnid, files sorted within each), as GradNorm's ``ImageFolder(args.in_datadir)`` reads them. Each label is
  the wnid's index in the *model's* class order (``class_order``, from the checkpoint's meta): sorted wnids for
  torchvision's models (ImageFolder's indices), MOS's ``imagenet2012_val_list.txt`` order for BiT
  (``utils.released``). ``train=True`` reads ``imagenet/train/<wnid>/*.JPEG`` the same way (the fit data of
  ``--dataset train``; ImageNet models are imported, not trained here, so there is no augmentation).
* ``iNaturalist``, ``SUN``, ``Places`` — MOS's curated 10,000-image subsets, images at any depth below
  ``ood_datasets/<name>/``, in ImageFolder's order (``imagefolder_order``: GradNorm reads them with
  ``ImageFolder(args.out_datadir)``); Textures is the whole of DTD (``dtd``, ``utils.data.folders``).

Every image goes through the model's input transform (``utils.data.transforms``; BiT: Resize((480, 480))).
"""
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.data.common import not_found
from utils.data.folders import IMAGE_EXTENSIONS, ImageFiles
from utils.data.transforms import IMAGENET_V1, InputTransform
from utils.errors import DataNotFoundError, UserError

NAME = "ImageNet"
NUM_CLASSES = 1000
NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's, the training images' statistics
CLASS_ORDER_KEY = "class_order"  # in a checkpoint's meta: the wnid of each output, when not sorted wnids
IMAGENET_SOURCE = ("Get ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar for --dataset train) from "
                   "https://image-net.org/download.php (a free account) and sort the validation images into one "
                   "folder per wnid, e.g. with the valprep.sh of https://github.com/soumith/imagenetloader.torch.")
MOS_SOURCE = ("MOS's curated subsets (Huang & Li, CVPR 2021; https://github.com/deeplearning-wisc/large_scale_ood): "
              "download http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/<name>.tar.gz (iNaturalist, SUN, "
              "Places) and unpack it in {ood}.")
OOD_SETS = ("iNaturalist", "SUN", "Places")
FAR_OOD = (*OOD_SETS, "dtd")  # GradNorm's Table 1: iNaturalist, SUN, Places, Textures


class LabeledImageFiles(ImageFiles):
    """Image files with a label each, through ``transform``."""

    def __init__(self, paths: list[Path], labels: list[int], transform: InputTransform):
        super().__init__(paths, transform)
        self.labels = labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def imagefolder_order(folder: Path) -> list[Path]:
    """Every image at any depth below ``folder`` in the order ``torchvision.datasets.ImageFolder(folder)`` reads
    them: its class folders by name, in each the folders as ``sorted(os.walk(...))`` lists them and their files
    sorted by name; images directly in ``folder`` (which ImageFolder would not read) come first."""
    images = sorted(path for path in folder.iterdir() if path.is_file())
    for sub in sorted(path for path in folder.iterdir() if path.is_dir()):
        for root, _, files in sorted(os.walk(sub, followlinks=True)):
            images += [Path(root) / name for name in sorted(files)]
    return [path for path in images if path.suffix.lower() in IMAGE_EXTENSIONS]


def class_folders(split_dir: Path) -> list[Path]:
    """The class folders of an ImageFolder split, sorted by name (ImageFolder's class indices)."""
    return sorted(path for path in split_dir.iterdir() if path.is_dir())


def build(data_root: Path, train: bool, *, augment: bool = True, transform: InputTransform = IMAGENET_V1,
          class_order: Sequence[str] | None = None) -> Dataset:
    """The validation (or training) images of ImageNet-1K, labelled in ``class_order`` (None: sorted wnids)."""
    if train and augment:
        raise UserError("ImageNet models are imported (import_checkpoint.py), not trained here: its training split "
                        "is read without augmentation only (--dataset train).")
    split = "train" if train else "val"
    split_dir = data_root / NAME.lower() / split
    if not split_dir.is_dir():
        use = ("the fit data of --dataset train (a seeded subset of it is read)" if train
               else "the 50,000 validation images")
        raise not_found(NAME, split_dir, f"It should hold {use} as {split}/<wnid>/*.JPEG, one folder per class.",
                        IMAGENET_SOURCE)
    folders = class_folders(split_dir)
    wnids = [folder.name for folder in folders]
    order = list(class_order) if class_order is not None else wnids
    index = {wnid: i for i, wnid in enumerate(order)}
    unknown = [wnid for wnid in wnids if wnid not in index]
    if unknown:
        raise DataNotFoundError(f"{NAME}: {split_dir} has class folders that the model's {len(order)} classes do "
                                f"not name ({', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}): it should "
                                f"hold one folder per ImageNet-1K wnid. {IMAGENET_SOURCE}")
    paths, labels = [], []
    for folder in folders:
        images = imagefolder_order(folder)
        paths += images
        labels += [index[folder.name]] * len(images)
    if not paths:
        raise DataNotFoundError(f"{NAME}: {split_dir} holds no images. {IMAGENET_SOURCE}")
    return LabeledImageFiles(paths, labels, transform)


def locate(data_root: Path) -> Path:
    split_dir = data_root / NAME.lower() / "val"
    if not split_dir.is_dir():
        raise not_found(NAME, split_dir, "It should hold the validation images as val/<wnid>/*.JPEG.", IMAGENET_SOURCE)
    return split_dir


def ood_images(name: str, data_root: Path) -> list[Path]:
    """The images of MOS's OOD set ``name`` (one of ``OOD_SETS``) at any depth, in ImageFolder's order."""
    folder = data_root / "ood_datasets" / name
    source = MOS_SOURCE.format(ood=data_root / "ood_datasets")
    if not folder.is_dir():
        raise not_found(name, folder, "It should hold the set's 10,000 images at any depth.", source)
    images = imagefolder_order(folder)
    if not images:
        raise DataNotFoundError(f"{name}: {folder} holds no images. {source}")
    return images


def build_ood(name: str, data_root: Path, *, transform: InputTransform = IMAGENET_V1) -> Dataset:
    return ImageFiles(ood_images(name, data_root), transform)


def read_class_order(path: Path) -> list[str]:
    """The wnid of each class index from MOS's ``imagenet2012_val_list.txt`` (lines ``val/<wnid>/<file> <label>``)."""
    if not path.is_file():
        raise UserError(f"class list not found: {path}. BiT's head follows the class order of MOS's "
                        f"imagenet2012_val_list.txt: get it from https://github.com/deeplearning-wisc/gradnorm_ood "
                        f"(data_lists/imagenet2012_val_list.txt) and pass it with --class-list.")
    order: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            file, label = line.rsplit(maxsplit=1)
            wnid, label = Path(file).parent.name, int(label)
        except ValueError:
            raise UserError(f"{path}, line {number}: expected '<split>/<wnid>/<file> <label>', got {line!r}.") from None
        if order.setdefault(label, wnid) != wnid:
            raise UserError(f"{path}, line {number}: label {label} is {wnid} here but {order[label]} earlier.")
    if sorted(order) != list(range(len(order))) or len(set(order.values())) != len(order):
        raise UserError(f"{path} does not give each of its {len(order)} labels 0, 1, … one distinct wnid.")
    return [order[label] for label in range(len(order))]
