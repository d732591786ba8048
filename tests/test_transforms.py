"""A model's input transform: the sizes it makes, its round trip through a checkpoint's meta, and its values
against PIL's own resize and crop written out in the test."""
import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.transforms import BIT, CIFAR, IMAGENET_V1, META_KEY, InputTransform


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 1000 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("transform, shape, expected", [
    (CIFAR, (36, 50), (32, 32)), (IMAGENET_V1, (300, 500), (224, 224)), (BIT, (300, 500), (480, 480))])
def test_sizes(transform, shape, expected):
    tensor = transform.compose()(_image(*shape))
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, *expected) == (3, *transform.size)
    assert 0 <= tensor.min() and tensor.max() <= 1


def test_values_are_pil_resize_then_centre_crop():
    image = _image(300, 500)  # Resize(256) of the shorter side: 256 x 426, then the centre 224 x 224
    resized = np.asarray(image.resize((426, 256), Image.BILINEAR), dtype=np.float32) / 255
    top, left = round((256 - 224) / 2), round((426 - 224) / 2)
    expected = torch.from_numpy(resized[top:top + 224, left:left + 224].transpose(2, 0, 1).copy())
    assert torch.allclose(IMAGENET_V1.compose()(image), expected, atol=1 / 255 + 1e-6)


def test_meta_round_trip_and_default():
    for transform in (CIFAR, IMAGENET_V1, BIT):
        assert InputTransform.from_meta({META_KEY: transform.to_meta()}) == transform
    assert InputTransform.from_meta({}) == CIFAR
    with pytest.raises(ValueError):
        _ = InputTransform(256, None).size
