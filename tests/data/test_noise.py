"""Statistics of the SNR-unit noise synthesis (not just shapes)."""

import numpy as np
import pytest

from cinema_jax.data import noise as N
from cinema_jax.errors import ConfigError


def _flat(shape=(96, 96, 24), value=20.0):
    return np.full(shape, value, np.complex64)


def test_filters_have_unit_power():
    for n in (63, 64, 96):
        for s in (0.8, 1.5, 2.25):
            assert np.mean(N.gaussian_filter(n, s) ** 2) == pytest.approx(1.0, rel=1e-6)
        for r in (0.875, 0.625):
            for pre in (True, False):
                assert np.mean(N.partial_fourier_filter(n, r, pre) ** 2) == pytest.approx(1.0, rel=1e-6)


def test_colouring_preserves_noise_std():
    rng = np.random.default_rng(1)
    stds = []
    for _ in range(12):
        white = N.complex_noise(1.0, (96, 96, 16), rng)
        col, info = N.colour_noise(white, rng, N.merge_config({"prob_apply_filter_t": 0.5}))
        stds.append((np.std(col.real), np.std(col.imag)))
        # colouring did something: neighbouring pixels become correlated when k-space was filtered
    stds = np.asarray(stds)
    # each draw: N = 147k samples per part; coloured noise has fewer effective samples, allow 3 %
    assert np.all(np.abs(stds - 1.0) < 0.03), stds
    assert abs(stds.mean() - 1.0) < 0.01


def test_colouring_correlates_neighbours():
    rng = np.random.default_rng(2)
    white = N.complex_noise(1.0, (128, 128, 8), rng)
    cfg = N.merge_config({"kspace_filter_sigma": (2.25,), "readout_resolution_ratio": (0.55,)})
    col, _ = N.colour_noise(white, rng, cfg)
    corr = np.corrcoef(col.real[1:].ravel(), col.real[:-1].ravel())[0, 1]
    assert corr > 0.3
    assert abs(np.corrcoef(white.real[1:].ravel(), white.real[:-1].ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("white", [True, False])
def test_flat_region_noise_std_is_g_in_snr_units(white):
    """Noise-free clean (clean_noise_std = 0): after SNR-unit scaling the added noise has std g exactly."""
    nx, ny, nt = 96, 96, 24
    g = np.ones((nx, ny), np.float32)
    g[:, ny // 2:] = 2.5
    cfg = {"clean_noise_std": 0.0, "only_white_noise": white, "min_noise_level": 3.0, "max_noise_level": 7.0}
    for seed in range(3):
        out = N.synthesize(_flat((nx, ny, nt)), np.random.default_rng(seed), cfg, gmap=g)
        diff = out["noisy"] - out["clean"]
        for region, gval in ((slice(0, ny // 2), 1.0), (slice(ny // 2, ny), 2.5)):
            d = diff[:, region]
            # ~110k samples per part; coloured noise keeps >= ~10k effective samples -> a few % error
            assert np.std(d.real) == pytest.approx(gval, rel=0.05)
            assert np.std(d.imag) == pytest.approx(gval, rel=0.05)
        np.testing.assert_array_equal(out["gmap"][..., 0], g)


def test_reference_scaling_sigma_over_sqrt_sigma2_plus_1():
    """Reference convention (clean carries unit noise): added noise std = g * sigma / sqrt(sigma^2 + 1)."""
    out = N.synthesize(_flat(), np.random.default_rng(5), {"only_white_noise": True, "acceleration": (1,)})
    sigma = out["sigma"]
    expect = sigma / np.sqrt(sigma**2 + 1)
    diff = out["noisy"] - out["clean"]
    assert np.std(diff.real) == pytest.approx(expect, rel=0.02)
    assert out["scale"] == pytest.approx(np.sqrt(sigma**2 + 1))
    assert np.all(out["gmap"] == 1.0)


def test_sigma_drawn_over_configured_range():
    sig = [N.synthesize(_flat((16, 16, 4)), np.random.default_rng(i), {"min_noise_level": 2.0,
                                                                       "max_noise_level": 8.0})["sigma"]
           for i in range(200)]
    assert 2.0 <= min(sig) and max(sig) < 8.0
    assert np.mean(sig) == pytest.approx(5.0, abs=0.35)  # uniform: mean 5, sd of mean 1.73/sqrt(200) = 0.12


@pytest.mark.parametrize("snr", [3.0, 10.0, 40.0])
def test_measured_snr_matches_requested(snr):
    cfg = {"snr_range": (snr, snr), "clean_noise_std": 0.0, "acceleration": (1,)}
    out = N.synthesize(_flat(value=50.0), np.random.default_rng(7), cfg)
    # flat clean of value 50 -> SNR-unit clean reads the SNR directly; noise std per part = 1
    measured = np.mean(out["clean"].real) / np.std((out["noisy"] - out["clean"]).real)
    assert measured == pytest.approx(snr, rel=0.03)
    assert np.mean(np.abs(out["clean"])) == pytest.approx(snr, rel=1e-4)


def test_no_snr_unit_scaling_keeps_image_units():
    out = N.synthesize(_flat(), np.random.default_rng(3), {"snr_unit": False, "only_white_noise": True,
                                                           "acceleration": (1,)})
    assert out["scale"] == 1.0
    np.testing.assert_allclose(out["clean"], _flat())
    assert np.std((out["noisy"] - out["clean"]).real) == pytest.approx(out["sigma"], rel=0.02)


def test_gmap_from_coils_is_at_least_one_and_one_without_acceleration():
    rng = np.random.default_rng(0)
    coils = N.coil_maps(64, 64, 16, rng)
    np.testing.assert_array_equal(N.sense_gmap(coils, 1), 1.0)
    medians = []
    for r in (2, 3, 4):
        g = N.sense_gmap(coils, r)
        assert g.min() >= 1.0 and np.isfinite(g).all()
        medians.append(np.median(g))
    assert medians[0] <= medians[1] <= medians[2]
    assert medians[2] > 1.2  # acceleration 4 with 16 coils amplifies noise somewhere substantial


def test_gmap_matches_sense_formula_for_one_group():
    """Brute-force check of one aliased group against the SENSE expression with numpy matrices."""
    rng = np.random.default_rng(4)
    coils = N.coil_maps(8, 12, 6, rng)
    g = N.sense_gmap(coils, 3, regularization=0.0, gmax=1e9)
    x, y = 5, 2
    s = np.stack([coils[:, x, (y + k * 4) % 12] for k in range(3)], axis=1)  # (C, R)
    m = s.conj().T @ s
    expect = np.sqrt((np.linalg.inv(m)[0, 0] * m[0, 0]).real)
    assert g[x, y] == pytest.approx(max(expect, 1.0), rel=1e-4)


def test_gmap_ablation_and_bank():
    rng = np.random.default_rng(0)
    g, info = N.sample_gmap(rng, 32, 40, N.merge_config({"gmap_augment": False}))
    assert np.all(g == 1.0) and info["source"] == "none"
    bank = np.stack([np.full((16, 16), 1.7, np.float32)])
    seen = set()
    for i in range(20):
        g, info = N.sample_gmap(np.random.default_rng(i), 32, 40, N.merge_config({"gmap_source": "bank"}), bank)
        assert g.shape == (32, 40)
        seen.add(round(float(g.mean()), 3))
    assert seen == {1.0, 1.7}
    with pytest.raises(ConfigError):
        N.sample_gmap(rng, 8, 8, N.merge_config({"gmap_source": "bank"}), None)


def test_unknown_key_is_config_error():
    with pytest.raises(ConfigError, match="noise.bogus"):
        N.merge_config({"bogus": 1})


def _record_fn(index, rng):
    clean = _flat((32, 32, 8), 10.0) * (1 + index)
    return N.synthesize(clean, rng, {"clean_noise_std": 0.0})["noisy"]


def test_same_record_same_sample_any_order_and_worker():
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's multiprocessing reads absl flags; pytest never parses them
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(6).random_map(_record_fn, seed=11)
    forward = [ds[i] for i in range(6)]
    backward = [ds[i] for i in reversed(range(6))][::-1]
    fresh = grain.MapDataset.range(6).random_map(_record_fn, seed=11)
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fresh[3], forward[3])
    assert not np.array_equal(forward[0], forward[1] / 2)  # different records get different noise
    it = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2))
    for a, b in zip(forward, it):
        np.testing.assert_array_equal(a, b)
    other = grain.MapDataset.range(6).random_map(_record_fn, seed=12)
    assert not np.array_equal(other[0], forward[0])


@pytest.mark.parametrize("sigma", [2.0, 15.0])
def test_estimate_noise_sigma_from_background(sigma):
    rng = np.random.default_rng(9)
    img = np.zeros((128, 128, 6), np.complex64)
    img[32:96, 32:96] = 300.0
    mag = np.abs(img + N.complex_noise(sigma, img.shape, rng))
    assert N.estimate_noise_sigma(mag) == pytest.approx(sigma, rel=0.06)


def test_estimate_noise_sigma_without_air_uses_tissue():
    rng = np.random.default_rng(10)
    mag = np.abs(np.full((96, 96, 4), 200.0, np.complex64) + N.complex_noise(4.0, (96, 96, 4), rng))
    assert N.estimate_noise_sigma(mag) == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 1.25, 1.5])
def test_matrix_size_change_keeps_snr_units(ratio):
    """k-space re-acquisition at another matrix: unit white noise stays unit; a flat signal is kept when enlarging
    and grows by sqrt(N / M) when the pixels get larger (the per-pixel SNR a scanner would give)."""
    rng = np.random.default_rng(0)
    n = 96
    noise = N.complex_noise(1.0, (n, n, 16), rng)
    out = N.adjust_matrix_size(noise, ratio)
    m = round(ratio * n)
    assert out.shape == (m, m, 16)
    assert np.std(out.real) == pytest.approx(1.0, abs=0.03) and np.std(out.imag) == pytest.approx(1.0, abs=0.03)
    flat = N.adjust_matrix_size(np.full((n, n, 2), 3.0 + 1.0j), ratio)
    expect = (3.0 + 1.0j) * (n / m if ratio < 1 else 1.0)
    np.testing.assert_allclose(flat[m // 2, m // 2], expect, rtol=1e-6)
    assert N.adjust_matrix_size(noise, 1.0) is noise
