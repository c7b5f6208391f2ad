"""Noise made on the accelerator (`noise.on_device`) has the law of the host's full-size noise cut to the window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.data import noise as noise_lib
from cinema_jax.data import noise_device


def _host_window_operator(shape, starts, crop, seed, cfg):
    """Rows (cut-out pixels) of the host path's colouring operator, one column per full-size input pixel: the
    response of `colour_noise` (re-drawing the same filters from the same seed) to each impulse."""
    n = int(np.prod(shape))
    cols = []
    for j in range(n):
        e = np.zeros(n, np.complex64)
        e[j] = 1.0
        out, _ = noise_lib.colour_noise(e.reshape(shape), np.random.default_rng(seed), cfg)
        sl = tuple(slice(s, s + c) for s, c in zip(starts, crop))
        cols.append(out[sl].reshape(-1))
    return np.stack(cols, axis=1).astype(np.complex128)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_window_factors_give_the_host_covariance_exactly(seed):
    cfg = noise_lib.merge_config({"prob_apply_filter_t": 1.0})
    shape, crop, starts = (20, 16, 6), (8, 6, 4), (5, 3, 1)
    m = _host_window_operator(shape, starts, crop, seed, cfg)
    fx, fy, ft, info = noise_lib.colour_filters(np.random.default_rng(seed), shape, cfg)
    assert info["sigma_t"] > 0 and ft is not None
    ls = [noise_lib.window_factor(f, s, c)[None] for f, s, c in zip((fx, fy, ft), starts, crop)]
    k = int(np.prod(crop))
    basis = jnp.asarray(np.eye(k, dtype=np.complex64).reshape((k,) + crop))
    j = np.asarray(noise_device.apply_factors(basis, *(jnp.asarray(np.repeat(x, k, 0)) for x in ls)))
    j = j.reshape(k, k).T.astype(np.complex128)  # column = response to one cut-out impulse
    host_cov, dev_cov = m @ m.conj().T, j @ j.conj().T
    np.testing.assert_allclose(np.diag(host_cov).real, 1.0, atol=1e-5)  # normalised filters keep unit variance
    np.testing.assert_allclose(dev_cov, host_cov, atol=2e-5)
    # a wrong axis order or a missing conjugate would not match
    wrong = np.asarray(noise_device.apply_factors(basis, *(jnp.asarray(np.repeat(x.conj(), k, 0)) for x in ls)))
    wrong = wrong.reshape(k, k).T
    assert np.abs(wrong @ wrong.conj().T - host_cov).max() > 1e-2


def test_window_factor_identity_and_bad_window():
    np.testing.assert_array_equal(noise_lib.window_factor(None, 0, 4), np.eye(4))
    f = noise_lib.gaussian_filter(16, 1.5)
    lw = noise_lib.window_factor(f, 0, 16)  # the whole axis: L L^H = K K^H, circulant with unit diagonal
    cov = lw @ lw.conj().T
    np.testing.assert_allclose(np.diag(cov).real, 1.0, atol=1e-5)
    np.testing.assert_allclose(cov[1:, 1:], cov[:-1, :-1], atol=1e-5)  # stationary
    with pytest.raises(ValueError, match="outside"):
        noise_lib.window_factor(f, 10, 8)


def test_plan_draws_what_synthesize_draws_before_the_noise():
    clean = (np.random.default_rng(0).random((24, 20, 5)) + 0.1).astype(np.complex64)
    cfg = {"snr_range": (2.0, 10.0), "clean_noise_std": 0.0}
    for seed in range(4):
        full = noise_lib.synthesize(clean, np.random.default_rng(seed), cfg)
        plan = noise_lib.draw_noise_plan(clean, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(plan["gmap"], full["gmap"])
        assert plan["sigma"] == full["sigma"] and plan["scale"] == full["scale"]
    with pytest.raises(Exception, match="on_device=False"):
        noise_lib.draw_noise_plan(clean, np.random.default_rng(0), {"add_poisson": True})


def test_device_noise_std_and_independence_of_the_sharding():
    b, shape = 8, (16, 12, 4)
    std = jnp.asarray(np.linspace(0.5, 4.0, b), jnp.float32)
    eye = lambda n: jnp.broadcast_to(jnp.eye(n, dtype=jnp.complex64), (b, n, n))
    key = jax.random.key(3)
    n = noise_device.coloured_noise(key, eye(16), eye(12), eye(4), std)
    assert n.shape == (b,) + shape and n.dtype == jnp.complex64
    per = np.asarray(n).reshape(b, -1)
    np.testing.assert_allclose(per.real.std(axis=1), np.asarray(std), rtol=0.1)
    np.testing.assert_allclose(per.imag.std(axis=1), np.asarray(std), rtol=0.1)
    assert abs(np.mean(per.real * per.imag / np.asarray(std)[:, None] ** 2)) < 0.05  # real, imag independent
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = [jax.device_put(x, sh) for x in (eye(16), eye(12), eye(4), std)]
    sharded = jax.jit(noise_device.coloured_noise)(key, *args)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(n), rtol=1e-6, atol=1e-6)


def test_model_inputs_add_g_scaled_noise_to_the_clean_cut_out():
    rng = np.random.default_rng(0)
    b, shape = 4, (16, 16, 4)
    clean = rng.normal(size=(b,) + shape + (2,)).astype(np.float32)
    g = (1.0 + rng.random((b,) + shape) * 3).astype(np.float32)
    eye = lambda n: np.broadcast_to(np.eye(n, dtype=np.complex64), (b, n, n)).copy()
    batch = dict(clean=clean, gmap=g, noise_std=np.full((b,), 2.0, np.float32), noise_lx=eye(16), noise_ly=eye(16),
                 noise_lt=eye(4))
    image, target = noise_device.model_inputs(batch, jax.random.key(0))
    image, target = np.asarray(image), np.asarray(target)
    np.testing.assert_array_equal(target, clean)
    np.testing.assert_array_equal(image[..., 2], g)
    resid = (image[..., :2] - clean) / g[..., None]
    assert abs(resid.std() - 2.0) < 0.1
    image_n, target_n = noise_device.model_inputs(batch, jax.random.key(0), snr_unit=False)
    scale = np.percentile(np.abs(image[..., 0] + 1j * image[..., 1]).reshape(b, -1), 99, axis=1)
    np.testing.assert_allclose(np.asarray(target_n), clean / scale[:, None, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(image_n)[..., 0], image[..., 0] / scale[:, None, None, None], rtol=1e-5,
                               atol=1e-6)
