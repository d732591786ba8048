"""``utils.data.synthetic``: the seeded Gaussian, Rademacher and blobs sets of Outlier Exposure."""

import numpy as np
import pytest
import torch

from tests.test_data import chw
from utils.data import (
    get_dataset,
)
from utils.data.bundled import photo_pyramid
from utils.errors import UserError

# ---------------------------------------------------------------------------------------------- generated sets


@pytest.mark.parametrize("name", ["gaussian", "rademacher", "blobs"])
def test_synthetic_sets_are_seeded(name):
    dataset = get_dataset(name)
    assert len(dataset) == 10_000 and len(get_dataset(name, num_samples=5)) == 5
    image, label = dataset[123]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == -1
    assert torch.equal(image, get_dataset(name)[123][0])
    assert not torch.equal(image, dataset[124][0])
    assert not torch.equal(image, get_dataset(name, seed=1)[123][0])
    with pytest.raises(IndexError):
        dataset[10_000]


def test_generated_sets_draw_each_image_from_its_own_seeded_generator():
    expected = np.clip(np.random.default_rng([3, 17]).normal(0.5, 0.25, size=(3, 32, 32)), 0, 1)
    assert torch.equal(get_dataset("gaussian", seed=3)[17][0], torch.from_numpy(expected.astype(np.float32)))
    rng = np.random.default_rng([3, 17])
    photo = photo_pyramid()[rng.integers(16)]
    top, left = rng.integers(photo.shape[0] - 31), rng.integers(photo.shape[1] - 31)
    assert torch.equal(get_dataset("sample_photos", seed=3)[17][0], chw(photo[top:top + 32, left:left + 32]))
    for name in ("blobs", "sample_photos"):
        with pytest.raises(UserError, match=f"{name}: num_samples must be positive"):
            get_dataset(name, num_samples=0)
        with pytest.raises(IndexError):
            get_dataset(name, num_samples=3)[3]


def test_synthetic_statistics():
    sample = lambda name: torch.stack([get_dataset(name)[index][0] for index in range(200)])  # noqa: E731
    gaussian = sample("gaussian")
    assert gaussian.min() >= 0 and gaussian.max() <= 1
    assert abs(gaussian.mean() - 0.5) < 0.005 and 0.23 < gaussian.std() < 0.25  # N(0.5, 0.25^2), clipped at 2 sigma
    assert 0.01 < (gaussian == 0).float().mean() < 0.04

    rademacher = sample("rademacher")
    assert set(rademacher.unique().tolist()) == {0.0, 1.0} and abs(rademacher.mean() - 0.5) < 0.01

    blobs = sample("blobs")
    nonzero = blobs[blobs > 0]
    assert nonzero.min() >= 0.75 and blobs.max() <= 1
    assert 0.1 < (blobs > 0).float().mean() < 0.7
    # OE blurs across the channel axis too, so the channels of a blob image are strongly correlated.
    assert np.corrcoef(blobs[:, 0].flatten(), blobs[:, 2].flatten())[0, 1] > 0.2


