"""SNR-unit noise synthesis for denoising training (SNRAware), numpy only.

Why: the SNRAware recipe trains on images whose noise std is 1 ("SNR units", so intensity reads as pixel SNR), with
the spatially varying noise amplification of parallel imaging (the g-factor map) simulated widely and given to the
model as an input channel. Everything here is a pure function of a clean complex series, a config dict and a
`np.random.Generator`, so a Grain `random_map` gives the same sample for the same record index in any worker.

Layout: clean series (X, Y, T) complex (x = readout, y = phase encoding); g-maps (X, Y) or (X, Y, T) float32.
Centred orthonormal FFTs are used throughout, so a k-space filter f with mean(f^2) = 1 keeps white-noise std.

Steps of `synthesize` (all switches and ranges in `DEFAULTS`, defaults = the reference's training values):
  1. g-map: simulated coil sensitivities + regular undersampling by R along y -> SENSE g-factor
     g = sqrt(diag((S^H S)^-1) * diag(S^H S)) per aliased pixel group; and/or a map drawn from a bank; R = 1 -> g = 1.
  2. noise level sigma ~ U[min_noise_level, max_noise_level) (units of the clean image), or, when `snr_range` is
     set, SNR ~ U[snr_range) and sigma = reference signal / SNR.
  3. white complex Gaussian noise, std sigma per real/imag part, coloured in k-space by resolution reduction,
     partial Fourier (tapered Hanning), Gaussian filters (x, y) and optionally a temporal Gaussian filter; the
     combined filters are normalised to preserve the noise std.
  4. noisy = clean + g * noise.
  5. SNR-unit scaling: both divided by sqrt(sigma^2 + clean_noise_std^2) (reference: clean images already carry
     unit noise, clean_noise_std = 1; a noise-free phantom uses 0 so the added noise has std exactly g).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# Reference values (SNRAware `configs/dataset/dataset_base.yaml` and `snr/noise.py`).
DEFAULTS: dict = {
    "min_noise_level": 0.1,  # sigma range, in the units of the clean image (SNR units for reference data)
    "max_noise_level": 128.0,
    "snr_range": (),  # () = draw sigma; (lo, hi) = draw the SNR of `snr_reference_percentile` signal instead
    "snr_reference_percentile": 95.0,
    "clean_noise_std": 1.0,  # noise std the clean image already carries (reference assumes 1 in SNR units)
    "snr_unit": True,  # False: no SNR-unit scaling (ablation); noisy/clean left in the clean image's units
    "only_white_noise": False,
    "kspace_filter_sigma": (0.8, 1.0, 1.5, 2.0, 2.25),
    "kspace_filter_sigma_t": (0.25, 0.5, 0.65, 0.85, 1.0, 1.5, 2.0, 2.25),
    "prob_apply_filter_t": 0.2,
    "pf_filter_ratio": (1.0, 0.875, 0.75, 0.625),
    "pf_taper_width": 10,
    "phase_resolution_ratio": (1.0, 0.75, 0.65, 0.55),
    "readout_resolution_ratio": (1.0, 0.75, 0.65, 0.55),
    "gmap_augment": True,  # False: g = 1 everywhere (ablation `ignore_gmap`)
    "gmap_source": "coils",  # 'coils' | 'bank' | 'both' (bank maps need `bank` passed to `synthesize`)
    "acceleration": (1, 2, 3, 4),  # R drawn uniformly; R = 1 gives g = 1 (reference: 1-in-(N+1) chance)
    "n_coils": (12, 32),  # inclusive range of simulated receive coils
    "coil_width": (0.1, 0.25),  # Gaussian sensitivity width, fraction of the FOV
    "gmap_grid": 64,  # g-maps are smooth: computed on at most this many pixels per axis, then interpolated
    "coil_radius": (0.55, 0.9),  # coil ring radius, fraction of the half FOV
    "sense_regularization": 1e-3,  # Tikhonov term relative to mean |S|^2, keeps empty-signal pixels finite
    "gmap_max": 20.0,
    "add_salt_pepper": False,
    "salt_pepper_amount": 0.4,
    "salt_pepper_prob": 0.4,
    "add_poisson": False,
    "poisson_prob": 0.4,
    # training only: the host draws the plan (g-map, level, filters; `draw_noise_plan`) and the accelerator draws
    # the noise of the cut-out from the same law inside the jitted step (`noise_device`); False: all on the host
    "on_device": False,
}


def merge_config(cfg: Mapping | None = None) -> dict:
    """Defaults updated by `cfg` (a dict or ConfigDict); unknown keys raise ConfigError naming the key."""
    out = dict(DEFAULTS)
    if cfg is None:
        return out
    items = cfg.items() if hasattr(cfg, "items") else dict(cfg).items()
    for key, value in items:
        if key not in DEFAULTS:
            from cinema_jax.errors import ConfigError

            raise ConfigError(f"unknown noise config key noise.{key}; known: {sorted(DEFAULTS)}")
        out[key] = value
    if float(out["min_noise_level"]) > float(out["max_noise_level"]):
        from cinema_jax.errors import ConfigError

        raise ConfigError("noise.min_noise_level must be <= noise.max_noise_level")
    return out


# ------------------------------------------------------------------------------------------------------ k-space
def fftc(x: np.ndarray, axes=(0, 1)) -> np.ndarray:
    """Centred orthonormal FFT (k-space centre at index n // 2)."""
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def ifftc(k: np.ndarray, axes=(0, 1)) -> np.ndarray:
    """Inverse of `fftc`."""
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)


def normalise_filter(f: np.ndarray) -> np.ndarray:
    """Scale a k-space filter so mean(f^2) = 1: white noise keeps its std after filtering (Parseval)."""
    f = np.asarray(f, np.float64)
    power = float(np.mean(f * f))
    return f / math.sqrt(power) if power > 0 else np.ones_like(f)


def gaussian_filter(n: int, sigma: float) -> np.ndarray:
    """Symmetric Gaussian k-space filter over [-1, 1] (sigma in those units; 0 = no filter), noise preserving.

    For even n the first sample is set to 0 so the filter is symmetric about the centre n // 2.
    """
    if sigma <= 0:
        return np.ones(n)
    if n % 2 == 0:
        x = np.linspace(-1.0, 1.0, n - 1)
        f = np.concatenate([[0.0], np.exp(-0.5 * sigma * sigma * x * x)])
    else:
        x = np.linspace(-1.0, 1.0, n)
        f = np.exp(-0.5 * sigma * sigma * x * x)
    return normalise_filter(f)


def partial_fourier_filter(n: int, ratio: float, pre_zero: bool, width: int = 10) -> np.ndarray:
    """Asymmetric partial-Fourier filter: `ratio` of k-space sampled, a tapered Hanning edge at the sampled edge.

    pre_zero=True samples the end of k-space (the start is zero-filled), False samples the start. Noise preserving.
    """
    m = int(ratio * n)
    f = np.zeros(n)
    if m >= n:
        return np.ones(n)
    start, stop = (n - m, n) if pre_zero else (0, m)
    f[start:stop] = 1.0
    width = max(1, min(width, m))
    ramp = 0.5 * (1.0 - np.cos(2.0 * np.pi * np.arange(1, width + 1) / (2 * width + 1)))
    if pre_zero:
        f[start:start + width] = ramp
    else:
        f[stop - width:stop] = ramp[::-1]
    return normalise_filter(f)


def resolution_filter(n: int, ratio: float) -> np.ndarray:
    """Zero the outer (1 - ratio) of k-space symmetrically (lower acquired resolution, same matrix). Not normalised."""
    f = np.ones(n)
    cut = int((n - ratio * n) // 2)
    if cut > 0:
        f[:cut] = 0.0
        f[n - cut:] = 0.0
    return f


def adjust_matrix_size(image: np.ndarray, ratio: float) -> np.ndarray:
    """Re-acquire a complex (X, Y, ...) series with round(ratio * matrix) pixels over the same field of view.

    Why (the reference's matrix-size augmentation): the model must meet the pixel sizes of many protocols. Done in
    k-space like a scanner: ratio < 1 keeps the central k-space (larger pixels; per-pixel signal grows by
    sqrt(N / M) and unit white noise stays unit: SNR units stay true), ratio > 1 zero-pads k-space scaled by
    sqrt(M / N) (sinc interpolation: intensities kept; unit noise stays unit, now correlated)."""
    nx, ny = image.shape[:2]
    mx, my = max(1, round(ratio * nx)), max(1, round(ratio * ny))
    if (mx, my) == (nx, ny):
        return image
    k = fftc(image, axes=(0, 1))
    if mx <= nx and my <= ny:
        x0, y0 = (nx - mx) // 2, (ny - my) // 2
        return ifftc(k[x0:x0 + mx, y0:y0 + my], axes=(0, 1))
    if mx >= nx and my >= ny:
        px, py = (mx - nx) // 2, (my - ny) // 2
        pad = [(px, mx - nx - px), (py, my - ny - py)] + [(0, 0)] * (image.ndim - 2)
        return ifftc(np.pad(k, pad), axes=(0, 1)) * math.sqrt(mx * my / (nx * ny))
    raise ValueError(f"matrix size ratio {ratio} must change both axes the same way")


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(0, len(options)))]


def _filter_centred(x: np.ndarray, f: np.ndarray, axes) -> np.ndarray:
    """ifftc(fftc(x) * f), with the shifts between the two transforms folded into the (small) filter: the same
    products, two fewer full-array rolls."""
    k = np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho")
    return np.fft.fftshift(np.fft.ifftn(k * np.fft.ifftshift(f, axes=axes), axes=axes, norm="ortho"), axes=axes)


def colour_filters(rng: np.random.Generator, shape, cfg: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                            dict]:
    """Draw the k-space filters `colour_noise` applies to noise of `shape` (X, Y, T): fx (X,), fy (Y,) and ft (T,) or
    None, each normalised (mean f^2 = 1), and their description.

    Draws resolution-reduction ratios, a partial-Fourier mode (x, y or both; pre/post zero), Gaussian filter sigmas
    for x and y and, with probability `prob_apply_filter_t`, a temporal Gaussian filter.
    """
    nx, ny, nt = shape
    rx = float(_pick(rng, cfg["readout_resolution_ratio"]))
    ry = float(_pick(rng, cfg["phase_resolution_ratio"]))
    pf_axes = int(rng.integers(0, 3))  # 0: x only, 1: y only, 2: both
    pfx, pfy = float(_pick(rng, cfg["pf_filter_ratio"])), float(_pick(rng, cfg["pf_filter_ratio"]))
    prex, prey = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    if pf_axes == 1:
        pfx = 1.0
    if pf_axes == 0:
        pfy = 1.0
    width = int(cfg["pf_taper_width"])
    gx, gy = float(_pick(rng, cfg["kspace_filter_sigma"])), float(_pick(rng, cfg["kspace_filter_sigma"]))
    fx = normalise_filter(gaussian_filter(nx, gx) * partial_fourier_filter(nx, pfx, prex, width)
                          * resolution_filter(nx, rx))
    fy = normalise_filter(gaussian_filter(ny, gy) * partial_fourier_filter(ny, pfy, prey, width)
                          * resolution_filter(ny, ry))
    info = dict(readout_ratio=rx, phase_ratio=ry, pf_x=pfx, pf_y=pfy, sigma_x=gx, sigma_y=gy, sigma_t=0.0)
    ft = None
    if nt > 1 and rng.random() < float(cfg["prob_apply_filter_t"]):
        gt = float(_pick(rng, cfg["kspace_filter_sigma_t"]))
        ft = gaussian_filter(nt, gt)
        info["sigma_t"] = gt
    return fx, fy, ft, info


def colour_noise(noise: np.ndarray, rng: np.random.Generator, cfg: Mapping) -> tuple[np.ndarray, dict]:
    """Colour complex white noise (X, Y, T) in k-space with filters drawn by `colour_filters`; std preserved."""
    fx, fy, ft, info = colour_filters(rng, noise.shape, cfg)
    out = _filter_centred(noise, fx[:, None, None] * fy[None, :, None], axes=(0, 1))
    if ft is not None:
        out = _filter_centred(out, ft[None, None, :], axes=(2,))
    return out.astype(np.complex64), info


def window_factor(f: np.ndarray | None, start: int, size: int) -> np.ndarray:
    """L (size, size) complex64 with L L^H = the covariance of `size` consecutive samples (from `start`) of unit
    white noise filtered along one axis by `f` as `colour_noise` does (f None: no filter, L = I).

    Why: the coloured noise is (Kx (x) Ky (x) Kt) w with each K the circulant `ifftc(f * fftc(.))` over the full
    series, so a cut-out of it is a circular Gaussian with covariance Gx (x) Gy (x) Gt, G = K[win] K[win]^H. Applying
    the three small L's to white noise of the cut-out's size draws from exactly that law: the accelerator can make
    the noise of a 64x64x16 cut-out without the full-size draws and FFTs (`noise_device`)."""
    if f is None:
        return np.eye(size, dtype=np.complex64)
    n = len(f)
    if not 0 <= start <= n - size:
        raise ValueError(f"window [{start}, {start + size}) is outside an axis of {n}")
    k = _filter_centred(np.eye(n, dtype=np.complex128), np.asarray(f, np.float64)[:, None], axes=(0,))
    rows = k[start:start + size]  # column j of k: the response to an impulse at j
    lam, u = np.linalg.eigh(rows @ rows.conj().T)
    return (u * np.sqrt(np.clip(lam, 0.0, None))).astype(np.complex64)


# ------------------------------------------------------------------------------------------------------ g-factor
def coil_maps(nx: int, ny: int, n_coils: int, rng: np.random.Generator, width=(0.3, 0.8),
              radius=(0.55, 0.9)) -> np.ndarray:
    """Smooth complex receive sensitivities (n_coils, X, Y): Gaussian blobs on a jittered ring around the FOV
    centre, each with a linear phase ramp; FOV coordinates span [-1, 1] on both axes."""
    x = np.linspace(-1.0, 1.0, nx)[:, None]
    y = np.linspace(-1.0, 1.0, ny)[None, :]
    angles = 2 * np.pi * (np.arange(n_coils) / n_coils + rng.uniform(0, 1.0 / n_coils, n_coils))
    rad = rng.uniform(radius[0], radius[1], n_coils)
    w = 2.0 * rng.uniform(width[0], width[1], n_coils)
    maps = np.empty((n_coils, nx, ny), np.complex128)
    for c in range(n_coils):
        cx, cy = rad[c] * np.cos(angles[c]), rad[c] * np.sin(angles[c])
        mag = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w[c] ** 2))
        phase = rng.uniform(-np.pi, np.pi) + rng.uniform(-1.5, 1.5) * x + rng.uniform(-1.5, 1.5) * y
        maps[c] = mag * np.exp(1j * phase)
    return maps


def sense_gmap(coils: np.ndarray, accel: int, regularization: float = 1e-3, gmax: float = 20.0) -> np.ndarray:
    """SENSE g-factor (X, Y) for regular undersampling by `accel` along y (phase encoding), identity noise covariance.

    Pixel y aliases with y + k * Y / accel (rounded, circular); with S the (coils x accel) sensitivities of the
    group, g = sqrt([(S^H S + lam I)^-1]_00 * [S^H S]_00) for the group's own pixel (column 0), clipped to [1, gmax].
    accel = 1 gives exactly 1.
    """
    nc, nx, ny = coils.shape
    if accel <= 1:
        return np.ones((nx, ny), np.float32)
    shifts = [int(round(k * ny / accel)) for k in range(accel)]
    s = np.stack([np.roll(coils, -sh, axis=2) for sh in shifts], axis=-1)  # (C, X, Y, R): column k = pixel y+shift
    s = np.moveaxis(s, 0, 2)  # (X, Y, C, R)
    m = np.einsum("xycr,xycs->xyrs", s.conj(), s)  # S^H S, (X, Y, R, R)
    lam = regularization * float(np.mean(np.abs(coils) ** 2)) * nc
    inv = np.linalg.inv(m + lam * np.eye(accel))
    g = np.sqrt(np.clip(inv[..., 0, 0].real * m[..., 0, 0].real, 0.0, None))
    return np.clip(g, 1.0, gmax).astype(np.float32)


def resize_map(g: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Separable linear resize of a smooth (X', Y') map to (nx, ny), pixel centres aligned."""
    g = np.asarray(g, np.float64)

    def axis_weights(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    lo, hi, w = axis_weights(nx, g.shape[0])
    g = g[lo] * (1 - w)[:, None] + g[hi] * w[:, None]
    lo, hi, w = axis_weights(ny, g.shape[1])
    return (g[:, lo] * (1 - w)[None, :] + g[:, hi] * w[None, :]).astype(np.float32)


def sample_gmap(rng: np.random.Generator, nx: int, ny: int, cfg: Mapping,
                bank: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Draw one g-map (X, Y) float32 >= 1 and its description ({'accel', 'n_coils', 'source'})."""
    if not cfg["gmap_augment"]:
        return np.ones((nx, ny), np.float32), dict(accel=1, n_coils=0, source="none")
    source = cfg["gmap_source"]
    use_bank = bank is not None and len(bank) > 0 and (source == "bank" or (source == "both" and rng.random() < 0.5))
    if source == "bank" and (bank is None or len(bank) == 0):
        from cinema_jax.errors import ConfigError

        raise ConfigError("noise.gmap_source='bank' needs a non-empty g-map bank")
    if use_bank:
        i = int(rng.integers(0, len(bank) + 1))
        if i == len(bank):  # the reference keeps a 1-in-(N+1) chance of no acceleration
            return np.ones((nx, ny), np.float32), dict(accel=1, n_coils=0, source="bank")
        g = resize_map(np.asarray(bank[i], np.float32), nx, ny)
        return np.maximum(g, 1.0).astype(np.float32), dict(accel=-1, n_coils=0, source="bank")
    accel = int(_pick(rng, cfg["acceleration"]))
    lo, hi = cfg["n_coils"]
    n_coils = int(rng.integers(int(lo), int(hi) + 1))
    grid = int(cfg["gmap_grid"])
    gx, gy = (nx, ny) if grid <= 0 else (min(nx, grid), min(ny, grid))
    coils = coil_maps(gx, gy, n_coils, rng, cfg["coil_width"], cfg["coil_radius"])
    if accel > 1 and rng.random() < 0.5:  # undersample along x instead of y (phase direction either way)
        g = sense_gmap(np.swapaxes(coils, 1, 2), accel, cfg["sense_regularization"], cfg["gmap_max"]).T
    else:
        g = sense_gmap(coils, accel, cfg["sense_regularization"], cfg["gmap_max"])
    if g.shape != (nx, ny):
        g = np.maximum(resize_map(g, nx, ny), 1.0)
    return np.ascontiguousarray(g, np.float32), dict(accel=accel, n_coils=n_coils, source="coils")


# ------------------------------------------------------------------------------------------------------ synthesis
def complex_noise(sigma: float, shape, rng: np.random.Generator) -> np.ndarray:
    """White complex Gaussian noise with std `sigma` in each of the real and imaginary parts."""
    out = np.empty(shape, np.complex64)  # the same draws and roundings as complex128 then a cast, without the copies
    out.real = sigma * rng.standard_normal(shape)
    out.imag = sigma * rng.standard_normal(shape)
    return out


def reference_signal(clean: np.ndarray, percentile: float) -> float:
    """Signal level an SNR refers to: a high percentile of |clean| over non-zero pixels (robust to background)."""
    mag = np.abs(clean)
    nz = mag[mag > 0]
    return float(np.percentile(nz, percentile)) if nz.size else 0.0


def _series(clean) -> np.ndarray:
    clean = np.asarray(clean)
    if clean.ndim != 3:
        raise ValueError(f"clean series must be (X, Y, T), got shape {clean.shape}")
    return clean.astype(np.complex64)


def _gmap_and_level(clean: np.ndarray, rng: np.random.Generator, cfg: Mapping, bank, gmap, need_snr: bool = True):
    """The first draws of a sample: its g-map (X, Y, T) and description, the noise level sigma, the SNR it gives
    (NaN when not `need_snr` and the level is drawn directly: the percentile is then not worth its time) and the
    SNR-unit divisor."""
    nx, ny, nt = clean.shape
    g2d, ginfo = sample_gmap(rng, nx, ny, cfg, bank)
    if gmap is not None:
        g = np.asarray(gmap, np.float32)
        g = np.broadcast_to(g if g.ndim == 3 else g[..., None], (nx, ny, nt)).astype(np.float32)
    else:
        g = np.broadcast_to(g2d[..., None], (nx, ny, nt)).astype(np.float32)
    u = float(rng.random())
    if cfg["snr_range"]:
        lo, hi = (float(v) for v in cfg["snr_range"])
        snr = lo + (hi - lo) * u
        sigma = reference_signal(clean, float(cfg["snr_reference_percentile"])) / snr
    else:
        sigma = float(cfg["min_noise_level"]) + (float(cfg["max_noise_level"]) - float(cfg["min_noise_level"])) * u
        snr = float("nan")
        if need_snr:
            ref = reference_signal(clean, float(cfg["snr_reference_percentile"]))
            snr = ref / sigma if sigma > 0 else float("inf")
    scale = math.sqrt(sigma * sigma + float(cfg["clean_noise_std"]) ** 2) if cfg["snr_unit"] else 1.0
    return g, ginfo, float(sigma), float(snr), (scale if scale > 0 else 1.0)


def synthesize(clean: np.ndarray, rng: np.random.Generator, cfg: Mapping | None = None,
               bank: np.ndarray | None = None, gmap: np.ndarray | None = None) -> dict:
    """One noisy training pair from a clean complex series (X, Y, T).

    Returns dict: 'noisy', 'clean' complex64 (X, Y, T) in SNR units (when cfg snr_unit); 'gmap' float32 (X, Y, T);
    'sigma' (noise std before scaling, clean-image units), 'snr' (reference signal / (sigma) before g), 'scale'
    (the divisor applied; 1 without SNR-unit scaling), 'accel', 'n_coils'. A given `gmap` (X, Y[, T]) overrides
    the drawn one (test sets, user maps). All randomness comes from `rng`, in a fixed draw order.
    """
    cfg = merge_config(cfg)
    clean = _series(clean)
    g, ginfo, sigma, snr, scale = _gmap_and_level(clean, rng, cfg, bank, gmap)
    noise = complex_noise(sigma, clean.shape, rng)
    info = {}
    if not cfg["only_white_noise"]:
        noise, info = colour_noise(noise, rng, cfg)
    noisy = clean + g * noise
    if cfg["add_salt_pepper"] and rng.random() < float(cfg["salt_pepper_prob"]):
        noisy = _salt_and_pepper(noisy, rng, float(cfg["salt_pepper_amount"]))
    if cfg["add_poisson"] and rng.random() < float(cfg["poisson_prob"]):
        lam = float(rng.integers(1, 10))
        mag = np.abs(clean) / lam
        noisy = noisy + (rng.poisson(mag) - mag).astype(np.float32)
    return dict(noisy=(noisy / scale).astype(np.complex64), clean=(clean / scale).astype(np.complex64), gmap=g,
                sigma=sigma, snr=snr, scale=float(scale), accel=int(ginfo["accel"]),
                n_coils=int(ginfo["n_coils"]), **info)


def draw_noise_plan(clean: np.ndarray, rng: np.random.Generator, cfg: Mapping | None = None,
                    bank: np.ndarray | None = None, gmap: np.ndarray | None = None) -> dict:
    """`synthesize` without the white noise: its g-map, sigma, SNR-unit `scale` and k-space filters ('fx', 'fy',
    'ft'; None = no filter), drawn in its order, for making the noise on the accelerator
    (`window_factor`, `noise_device`). Salt-and-pepper and Poisson noise depend on the noisy image: host only."""
    cfg = merge_config(cfg)
    if cfg["add_salt_pepper"] or cfg["add_poisson"]:
        from cinema_jax.errors import ConfigError

        raise ConfigError("noise.add_salt_pepper / noise.add_poisson need host synthesis: set noise.on_device=False")
    clean = _series(clean)
    g, ginfo, sigma, snr, scale = _gmap_and_level(clean, rng, cfg, bank, gmap, need_snr=False)
    fx = fy = ft = None
    info = {}
    if not cfg["only_white_noise"]:
        fx, fy, ft, info = colour_filters(rng, clean.shape, cfg)
    return dict(gmap=g, sigma=sigma, snr=snr, scale=float(scale), fx=fx, fy=fy, ft=ft, accel=int(ginfo["accel"]),
                n_coils=int(ginfo["n_coils"]), **info)


def _salt_and_pepper(x: np.ndarray, rng: np.random.Generator, max_amount: float) -> np.ndarray:
    """Scale a random fraction (< max_amount) of pixels up by U[1, 10) (salt) or down by U[0, 1) (pepper)."""
    out = x.copy().reshape(-1)
    frac_salt = rng.random()
    amount = rng.uniform(0, max_amount)
    n_salt = int(math.ceil(amount * out.size * frac_salt))
    n_pepper = int(math.ceil(amount * out.size * (1 - frac_salt)))
    out[rng.integers(0, out.size, n_salt)] *= rng.uniform(1.0, 10.0)
    out[rng.integers(0, out.size, n_pepper)] *= rng.uniform(0.0, 1.0)
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------------------ inference
def estimate_noise_sigma(magnitude: np.ndarray, background_fraction: float = 0.2) -> float:
    """Per-channel Gaussian noise std of a magnitude image (X, Y[, ...]) from its background.

    Why: user magnitude series (DICOM/NIfTI) carry no noise calibration, but the model expects SNR units. In
    air the magnitude of complex Gaussian noise is Rayleigh, mean = sigma * sqrt(pi / 2), so we take the darkest
    `background_fraction` of pixels (after a 3x3 local mean, to avoid isolated zeros), drop exact zeros (masked or
    zero-filled regions), and use the Rayleigh second moment: sigma = sqrt(mean(m^2) / 2), refined by re-selecting
    background as pixels whose local mean is within the Rayleigh range of that sigma. When the dark set is
    not noise-only (no air, e.g. tight FOV) the mode of the local std map (Gaussian in bright flat tissue: Rician
    -> Gaussian with std sigma) is used instead. Returns sigma in the image's intensity units (> 0).
    """
    m = np.asarray(magnitude, np.float64)
    if m.ndim < 2 or m.size == 0 or not np.all(np.isfinite(m)):
        raise ValueError("magnitude must be a finite array with at least 2 dimensions")
    m = np.abs(m)
    flat = m.reshape(m.shape[0], m.shape[1], -1)
    # local 3x3 mean per 2-D image: ranks pixels by neighbourhood brightness
    pad = np.pad(flat, ((1, 1), (1, 1), (0, 0)), mode="edge")
    local = sum(pad[i:i + flat.shape[0], j:j + flat.shape[1]] for i in range(3) for j in range(3)) / 9.0
    vals, loc = flat.reshape(-1), local.reshape(-1)
    keep = vals > 0
    if keep.sum() < 16:
        return float(max(np.std(vals), 1e-6))
    vals, loc = vals[keep], loc[keep]
    bg = vals[loc <= np.quantile(loc, background_fraction)]
    sigma = math.sqrt(float(np.mean(bg * bg)) / 2.0)
    # The darkest pixels under-estimate sigma (truncated Rayleigh). Refine: background = pixels whose 3x3 mean is
    # below the Rayleigh mean + 4 sd of a 9-pixel mean (1.2533 + 4 * 0.218) * sigma, re-fit, repeat.
    for _ in range(10):
        sel = vals[loc <= 2.13 * sigma]
        if sel.size < 16:
            break
        new = math.sqrt(float(np.mean(sel * sel)) / 2.0)
        if abs(new - sigma) <= 1e-4 * sigma:
            sigma = new
            break
        sigma = new
    bg = vals[loc <= 2.13 * sigma]
    # Rayleigh check: mean/std of Rayleigh samples is ~1.91; a much larger ratio means the dark set holds signal
    ratio = float(np.mean(bg) / max(np.std(bg), 1e-12)) if bg.size >= 16 else np.inf
    if ratio < 3.0:
        return max(sigma, 1e-6)
    diffs = (flat[1:, :, :] - flat[:-1, :, :]).reshape(-1)  # flat-tissue noise: std of neighbour differences
    mad = float(np.median(np.abs(diffs - np.median(diffs))))
    return max(1.4826 * mad / math.sqrt(2.0), 1e-6)
