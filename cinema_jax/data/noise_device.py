"""The accelerator half of SNR-unit noise synthesis (`noise.on_device`): coloured noise of the cut-out, in the step.

Why: on the host the noise costs two full-size normal draws and full-size FFTs per sample (~90 ms for 192x192x25),
so one worker made ~11 samples/s against ~160 an H100 step consumes. The host now draws only the plan
(`noise.draw_noise_plan`: g-map, level, k-space filters) and sends, per sample, the clean cut-out in SNR units, its
g-map, the noise std in SNR units and three small factors L (`noise.window_factor`, L L^H = the cut-out's covariance
along x, y, t). Here: noise = std * (Lx (x) Ly (x) Lt) w with w unit complex white noise of the cut-out's size, which
has the law of the host's full-size coloured noise cut to the window (the filters are separable).

Batch keys (leading batch dim): 'clean' (B, X, Y, T, 2) real/imag in SNR units, 'gmap' (B, X, Y, T) (ones when the
g-map ablation is on), 'noise_std' (B,), 'noise_lx' (B, X, X), 'noise_ly' (B, Y, Y), 'noise_lt' (B, T, T) complex64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PLAN_KEYS = ("clean", "gmap", "noise_std", "noise_lx", "noise_ly", "noise_lt")
HIGHEST = jax.lax.Precision.HIGHEST  # the factors are tiny: no reason to round them to TF32 / bf16 passes


def coloured_noise(key, lx, ly, lt, std):
    """(B, X, Y, T) complex64 = std * (Lx (x) Ly (x) Lt) w, w with independent N(0, 1) real and imaginary parts."""
    b, nx, ny, nt = lx.shape[0], lx.shape[-1], ly.shape[-1], lt.shape[-1]
    kr, ki = jax.random.split(key)
    w = jax.lax.complex(jax.random.normal(kr, (b, nx, ny, nt), jnp.float32),
                        jax.random.normal(ki, (b, nx, ny, nt), jnp.float32))
    return apply_factors(w, lx, ly, lt) * std.astype(jnp.float32)[:, None, None, None]


def apply_factors(w, lx, ly, lt):
    """(Lx (x) Ly (x) Lt) w per sample: three small batched matmuls, one per axis."""
    n = jnp.einsum("bxa,bayt->bxyt", lx, w, precision=HIGHEST)
    n = jnp.einsum("bya,bxat->bxyt", ly, n, precision=HIGHEST)
    return jnp.einsum("bta,bxya->bxyt", lt, n, precision=HIGHEST)


def model_inputs(batch, key, snr_unit: bool = True, percentile: float = 99.0):
    """(image (B, X, Y, T, 3) = noisy real, imag, g-map; target (B, X, Y, T, 2) clean) in model units.

    With `snr_unit` model units are SNR units; otherwise (ablation) each sample is divided by its `percentile`-th
    noisy magnitude, as the host transform does."""
    clean = jax.lax.complex(batch["clean"][..., 0], batch["clean"][..., 1]).astype(jnp.complex64)
    g = batch["gmap"].astype(jnp.float32)
    noisy = clean + g * coloured_noise(key, batch["noise_lx"], batch["noise_ly"], batch["noise_lt"],
                                       batch["noise_std"])
    target = batch["clean"].astype(jnp.float32)
    if not snr_unit:
        mag = jnp.abs(noisy).reshape(noisy.shape[0], -1)
        scale = jnp.percentile(mag, percentile, axis=1)
        scale = jnp.where(scale > 0, scale, 1.0)[:, None, None, None]
        noisy = noisy / scale
        target = target / scale[..., None]
    image = jnp.stack([noisy.real, noisy.imag, g], axis=-1)
    return image, target
