"""``utils.data.bundled``: scikit-learn's digits and crops of its photographs."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from tests.test_data import is_shift
from utils.data import (
    NORMALIZATION,
    get_dataset,
)


def test_digits():
    train, test = get_dataset("digits", train=True), get_dataset("digits")
    assert (len(train), len(test)) == (1297, 500)
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    labels = np.array([test[index][1] for index in range(len(test))])
    proportional = np.bincount(load_digits().target) * 500 / 1797
    assert np.all(np.abs(np.bincount(labels, minlength=10) - proportional) <= 1)  # stratified
    assert torch.equal(torch.stack([test[index][0] for index in range(20)]),
                       torch.stack([get_dataset("digits")[index][0] for index in range(20)]))

    images = train.images.expand(-1, 3, -1, -1)
    assert images.min() >= 0 and images.max() <= 1
    mean, std = NORMALIZATION["digits"]
    assert np.allclose(images.mean(dim=(0, 2, 3)), mean, atol=1e-4)
    assert np.allclose(images.std(dim=(0, 2, 3)), std, atol=1e-4)

    torch.manual_seed(0)
    for index in range(30):  # a crop, never a mirror image
        augmented, label = train[index]
        assert label == train.labels[index] and is_shift(augmented, images[index], flips=False)


def test_sample_photos():
    dataset = get_dataset("sample_photos", num_samples=50)
    assert len(dataset) == 50 and len(get_dataset("sample_photos")) == 10_000
    crops = torch.stack([dataset[index][0] for index in range(50)])
    assert crops.shape == (50, 3, 32, 32) and crops.min() >= 0 and crops.max() <= 1
    assert dataset[7][1] == -1
    assert torch.equal(crops, torch.stack([get_dataset("sample_photos", num_samples=50)[index][0]
                                           for index in range(50)]))
    assert len({crop.sum().item() for crop in crops}) == 50
    assert not torch.equal(crops[0], get_dataset("sample_photos", seed=1)[0][0])
    flipped = get_dataset("sample_photos", train=True)[0][0]
    assert torch.equal(flipped, crops[0]) or torch.equal(flipped, crops[0].flip(-1))
