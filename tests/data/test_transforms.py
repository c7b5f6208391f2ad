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


def _pattern(shape):
    return ((np.arange(int(np.prod(shape))) * 7 % 11) / 10.0).reshape(shape).astype(np.float32)


# MONAI `Zoom(zoom=f, mode=..., padding_mode="constant", keep_size=True)` (torch interpolate) on _pattern(shape),
# computed once with monai 1.6.1 / torch 2.14.1 and rounded to 5 decimals: the reference augmentation's numbers.
MONAI_ZOOM = [
    ((6, 5), 3, 1.25, [
        0.57436, 0.42671, 0.5877, 1.01862, 0.56709, 0.82163, 0.73084, 0.27315, 0.34243, 0.76788, 0.26824,
        0.53763, 0.39892, 0.30655, 1.09049, 0.01528, 0.54998, 0.78356, 0.38092, 0.55788, 0.33432, 0.44327,
        0.66714, 0.45712, 0.02882, 0.60221, 0.03931, 0.25394, 0.7526, 0.33688]),
    ((6, 5), 3, 0.8, [
        0, 0, 0, 0, 0, 0.11996, 0.67032, 0.61427, 0.65866, 0, 0.32025, 0.36463, 0.29584, 0.96283, 0, 0.61296,
        0.38781, 0.70012, 0.09573, 0, 0.92442, 0.31101, 0.61057, 0.51109, 0, 0, 0, 0, 0, 0]),
    ((4, 4, 3), 1, 1.4, [
        0.4375, 0.55, 0.3, 0.65625, 0.48, 0.23, 0.7, 0.4, 0.15, 0.62, 0.32, 0.07, 0.44625, 0.55875, 0.79,
        0.46287, 0.48875, 0.72, 0.42, 0.40875, 0.64, 0.34, 0.32875, 0.56, 0.59375, 0.70625, 0.8, 0.52375,
        0.63625, 0.73, 0.44375, 0.55625, 0.65, 0.36375, 0.47625, 0.57, 0.74125, 0.73, 0.48, 0.67125, 0.66,
        0.41, 0.59125, 0.58, 0.33, 0.51125, 0.53712, 0.349]),
    ((4, 4, 3), 1, 0.75, [
        0.34375, 0.45417, 0, 0.78333, 0.32083, 0, 0.65, 0.1875, 0, 0, 0, 0, 0.52083, 0.74583, 0, 0.3875,
        0.6125, 0, 0.25417, 0.47917, 0, 0, 0, 0, 0.8125, 0.35, 0, 0.67917, 0.21667, 0, 0.54583, 0.65625, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("shape, order, factor, want", MONAI_ZOOM)
def test_zoom_matches_the_reference_monai_zoom(shape, order, factor, want):
    got = T.zoom_keep_size(_pattern(shape), factor, order)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(-1), want, atol=2e-5)


def test_zoom_of_a_ramp_is_exact_and_odd_sizes_crop_like_monai():
    """Linear interpolation reproduces a ramp: each output equals its source coordinate, with
    half-pixel centres (src = (i + start + 0.5) * n / floor(n * f) - 0.5), the crop window starting at
    floor(n_out / 2) - floor(n / 2)."""
    n, f = 33, 1.1
    n_out = int(np.floor(n * f))  # 36
    start = n_out // 2 - n // 2  # 2 (not (36 - 33) // 2 = 1)
    ramp = np.arange(n, dtype=np.float32)
    src = (np.arange(n) + start + 0.5) * n / n_out - 0.5
    got = T.zoom_keep_size(np.repeat(ramp[:, None], 4, 1), f, 1)[:, 0]
    np.testing.assert_allclose(got, src, atol=1e-4)
    assert np.allclose(T.zoom_keep_size(np.full((9, 7), 0.3, np.float32), 1.1, 3), 0.3)  # cubic keeps constants
    with pytest.raises(ValueError, match="order must be 1"):
        T.zoom_keep_size(ramp, 1.1, 2)
