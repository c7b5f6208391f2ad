"""Pretraining transforms: crop/pad, end padding, min-max scaling, random zoom (numpy, rng-driven)."""

import numpy as np
import pytest

from cinema_jax.data import transforms as T


def test_crop_or_pad_center_and_end():
    a = np.arange(6, dtype=np.float32).reshape(6, 1)
    assert T.crop_or_pad(a, (4,))[:, 0].tolist() == [1, 2, 3, 4]
    assert T.crop_or_pad(a, (4,), mode="end")[:, 0].tolist() == [0, 1, 2, 3]
    padded = T.crop_or_pad(a, (8,))
    assert padded[:, 0].tolist() == [0, 0, 1, 2, 3, 4, 5, 0]
    assert T.crop_or_pad(a, (9,), mode="end")[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0]
    with pytest.raises(ValueError):
        T.crop_or_pad(a, (4,), mode="middle")


def test_pad_end_sax_slices_to_16():
    sax = np.ones((8, 8, 10), np.float32)
    out = T.pad_end(sax, (8, 8, 16))
    assert out.shape == (8, 8, 16) and out[..., :10].min() == 1 and out[..., 10:].max() == 0
    assert T.pad_end(np.ones((8, 8, 20)), (8, 8, 16)).shape == (8, 8, 20)  # never crops


def test_minmax_scale():
    x = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(T.minmax_scale(x), [0, 0.5, 1])
    assert T.minmax_scale(np.full(3, 7.0)).max() == 0


def test_random_zoom_keeps_size_and_is_rng_driven():
    img = np.random.default_rng(0).random((16, 16, 4)).astype(np.float32)
    a = T.random_zoom(img, np.random.default_rng(1), prob=1.0)
    b = T.random_zoom(img, np.random.default_rng(1), prob=1.0)
    assert a.shape == img.shape and np.array_equal(a, b)
    assert not np.allclose(a, img)
    assert np.array_equal(T.random_zoom(img, np.random.default_rng(1), prob=0.0), img)
    lax = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    assert T.random_zoom(lax, np.random.default_rng(2), prob=1.0).shape == (16, 16)


def test_zoom_out_pads_with_zeros_and_zoom_in_crops():
    img = np.ones((20, 20), np.float32)
    small = T.zoom_keep_size(img, 0.9, order=1)
    assert small.shape == (20, 20) and small[0, 0] == 0 and small[10, 10] == pytest.approx(1)
    big = T.zoom_keep_size(img, 1.1, order=3)
    assert big.shape == (20, 20) and np.allclose(big, 1, atol=1e-5)


def test_zoom_probability_about_half():
    # (factors within 1/128 of 1 leave a 64-pixel image unchanged, as MONAI's size-rounding zoom does)
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    changed = sum(not np.array_equal(T.random_zoom(img, np.random.default_rng(s)), img) for s in range(200))
    assert 65 < changed < 125
