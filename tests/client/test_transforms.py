"""Batched preprocessing gives every image what preprocessing it alone gives."""

import numpy as np
import pytest
import torch

from client.transforms import TransformConfig, preprocess, preprocess_batch

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("shape", [(70, 70), (50, 40), (64, 64), (70, 70, 3), (9, 130)])
@pytest.mark.parametrize("modality", ["DX", "CT"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_a_batch_equals_its_images_preprocessed_one_by_one(shape, modality, in_channels):
    config = TransformConfig(kind="2d", image_size=64, in_channels=in_channels)
    values = RNG.normal(0.0, 800.0, (6, *shape)).astype(np.float32)
    values[2] = 5.0  # a flat image: no contrast to stretch

    batch = preprocess_batch(values, modality=modality, config=config)

    assert batch.shape == (6, in_channels, 64, 64) and batch.dtype == torch.float32
    for image, sample in zip(values, batch, strict=True):
        torch.testing.assert_close(
            sample, preprocess(image, modality=modality, config=config), rtol=0, atol=1e-6
        )


def test_percentile_window_maps_1st_to_99th_percentile_to_unit_range():
    config = TransformConfig(kind="2d", image_size=10)
    values = np.arange(100, dtype=np.float32).reshape(10, 10)

    image = preprocess(values, modality="DX", config=config)

    assert image.min() == 0.0 and image.max() == 1.0
    assert image[0, 0, 1] == pytest.approx((1 - 0) / (99 - 0))  # 1st percentile is 0 here
