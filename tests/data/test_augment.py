"""Chen 2019 pipeline: determinism per rng, label/image consistency, landmarks following the transform, ranges."""

import numpy as np
import pytest
from scipy import ndimage

from cinema_jax.data import augment as aug


def _blob(shape=(48, 40, 3)):
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    lab2 = ((x - 20) ** 2 + (y - 18) ** 2 < 64).astype(np.uint8) * 3
    lab2[(x - 20) ** 2 + (y - 18) ** 2 >= 64] = 0
    ring = ((x - 20) ** 2 + (y - 18) ** 2 >= 64) & ((x - 20) ** 2 + (y - 18) ** 2 < 121)
    lab2[ring] = 2
    lab = np.repeat(lab2[..., None], shape[2], -1) if len(shape) == 3 else lab2
    img = (lab == 3) * 1.0 + (lab == 2) * 0.3 + 0.05
    return img.astype(np.float32), lab


def test_deterministic_per_rng_and_varies_across_seeds():
    img, lab = _blob()
    a = aug.chen_pipeline(img, lab, (1.0, 1.0, 10.0), np.random.default_rng(3), None, train=True)
    b = aug.chen_pipeline(img, lab, (1.0, 1.0, 10.0), np.random.default_rng(3), None, train=True)
    c = aug.chen_pipeline(img, lab, (1.0, 1.0, 10.0), np.random.default_rng(4), None, train=True)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])


def test_resample_and_crop_geometry():
    img, lab = _blob((50, 50, 2))
    out = aug.chen_pipeline(img, lab, (1.0, 1.0, 10.0), np.random.default_rng(0), {"crop_size": (32, 32)}, False)
    assert out["image"].shape == (32, 32, 2) and out["label"].shape == (32, 32, 2)
    assert out["spacing"] == (1.25, 1.25, 10.0)
    assert out["label"].dtype == np.uint8 and set(np.unique(out["label"])) <= {0, 2, 3}
    # LV area in mm^2 is preserved by the resampling (within a pixel ring)
    area_in = (lab[..., 0] == 3).sum() * 1.0
    area_out = (out["label"][..., 0] == 3).sum() * 1.25**2
    assert abs(area_out - area_in) / area_in < 0.15
    # per-slice z-score
    for k in range(2):
        assert abs(out["image"][..., k].mean()) < 1e-4 and abs(out["image"][..., k].std() - 1) < 1e-3
    mm = aug.chen_pipeline(img, lab, (1.0, 1.0, 10.0), np.random.default_rng(0), {"normalise": "minmax"}, False)
    assert mm["image"].min() >= 0 and mm["image"].max() <= 1


def test_spatial_transform_keeps_labels_on_image_and_moves_points():
    img, lab = _blob((48, 40))
    cfg = aug.merge_config({"flip_prob": 0.5, "rotate_prob": 1.0, "scale_prob": 1.0, "translate_prob": 1.0,
                            "elastic_prob": 1.0})
    for seed in range(5):
        rng = np.random.default_rng(seed)
        tf = aug.sample_spatial(rng, img.shape, cfg)
        centre = np.array([[20.0, 18.0]])
        im2, lab2, pts = aug.apply_spatial(tf, img, lab, centre)
        assert lab2.dtype == lab.dtype and set(np.unique(lab2)) <= {0, 2, 3}
        # nearest-warped label and linearly warped image agree: LV pixels are bright in the image
        if (lab2 == 3).sum() > 10:
            assert im2[lab2 == 3].mean() > 0.8
        # a Gaussian spot's peak lands where the point transform sends its centre (elastic included)
        spot = np.zeros(img.shape, np.float32)
        spot[20, 18] = 1.0
        spot = ndimage.gaussian_filter(spot, 2.0)
        warped, _, _ = aug.apply_spatial(tf, spot)
        peak = np.unravel_index(np.argmax(warped), warped.shape)
        assert np.linalg.norm(np.array(peak) - pts[0]) <= 1.0


def test_intensity_ops_and_no_augmentation():
    img, lab = _blob((32, 32, 2))
    cfg = aug.merge_config({k: 1.0 for k in ("contrast_prob", "gamma_prob", "bias_prob", "noise_prob", "lowres_prob",
                                             "thick_slice_prob")})
    out = aug.apply_intensity(img, np.random.default_rng(0), cfg)
    assert out.shape == img.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, img)
    off = aug.no_augmentation()
    same = aug.augment(img, lab, np.random.default_rng(0), off)
    assert np.allclose(same[0], img, atol=1e-5) and np.array_equal(same[1], lab)
    with pytest.raises(ValueError, match="unknown augmentation"):
        aug.merge_config({"flip": 1})


def test_random_crop_and_landmarks_follow_resampling():
    img = np.zeros((40, 40), np.float32)
    img[10, 30] = 1.0
    pts = np.array([[10.0, 30.0]])
    out = aug.chen_pipeline(img, None, (2.5, 2.5), np.random.default_rng(1),
                            aug.no_augmentation({"target_spacing": 1.25, "crop_size": (64, 64)}), False, pts)
    peak = np.unravel_index(np.argmax(out["image"]), out["image"].shape)
    assert np.linalg.norm(np.array(peak) - out["points"][0]) <= 1.0
