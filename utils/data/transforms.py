"""A model's input transform: how an image file becomes the tensor that model takes.

The resize and crop are part of the model, like its mean/std: they are stored in the checkpoint's meta under
``input_transform`` and every loader that feeds file images to that model applies them, so no script pairs a
model with the wrong preprocessing. Normalisation stays inside the model (``models.normalize``); the tensor
this produces is in [0, 1].

* CIFAR-sized models (the default, what a meta without the key means): Resize(32) + CenterCrop(32), ATOM's and
  energy_ood's test transform for the file-based OOD sets.
* torchvision's ImageNet V1 weights: Resize(256) + CenterCrop(224) (V2: Resize(232)); OpenOOD v1.5's test
  transform for ResNet-50.
* BiT (GradNorm, MOS): Resize((480, 480)), no crop.

``resize`` is an int (the shorter side, aspect ratio kept, as ``transforms.Resize(int)``) or ``(height, width)``
(both sides, as ``transforms.Resize((h, w))``); ``crop`` an int or None.
"""
from collections.abc import Callable
from dataclasses import dataclass

META_KEY = "input_transform"


@dataclass(frozen=True)
class InputTransform:
    resize: int | tuple[int, int] = 32
    crop: int | None = 32

    def compose(self) -> Callable:
        """The torchvision transform: RGB PIL image → float32 tensor in [0, 1] of shape ``(3, *self.size)``."""
        from torchvision import transforms  # here: importing torchvision costs seconds, most runs read no files

        steps = [transforms.Resize(self.resize)]
        if self.crop is not None:
            steps.append(transforms.CenterCrop(self.crop))
        return transforms.Compose([*steps, transforms.ToTensor()])

    @property
    def size(self) -> tuple[int, int]:
        """The (height, width) of the tensors it makes."""
        if self.crop is not None:
            return self.crop, self.crop
        if isinstance(self.resize, int):
            raise ValueError("Resize(int) without a crop keeps the aspect ratio: the size depends on the image")
        return tuple(self.resize)

    def to_meta(self) -> dict:
        return {"resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize, "crop": self.crop}

    @classmethod
    def from_meta(cls, meta: dict) -> "InputTransform":
        """The transform recorded in a checkpoint's ``meta`` (the CIFAR default when it records none)."""
        spec = meta.get(META_KEY)
        if spec is None:
            return CIFAR
        resize = spec["resize"]
        return cls(tuple(resize) if isinstance(resize, (list, tuple)) else int(resize), spec.get("crop"))


CIFAR = InputTransform(32, 32)
IMAGENET_V1 = InputTransform(256, 224)
IMAGENET_V2 = InputTransform(232, 224)
BIT = InputTransform((480, 480), None)
