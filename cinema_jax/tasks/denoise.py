"""SNRAware denoising task: clean complex cine -> SNR-unit noisy input + g-map -> denoised complex image.

`data.source`: 'synthetic' (default): light records (phantom seed, subject index, view, slice), the clean complex
2D+T slice rendered in the worker (cached per process); 'h5': the reference's training files (`data.path`; HDF5
`/<group>/<case>/{image, gmap}`, `h5cases.H5CaseSource`), clean images in SNR units with their own g-maps, one of
which (or, 1 time in N + 1, none) is the noise field of a sample, flipped and resized with the image; use the `h5`
config variant (noise level drawn as in the reference, clean noise std 1). `transform` synthesises the noise
(`cinema_jax.data.noise`) and crops. Sample layout (no batch dim):
'image' (X, Y, T, 3) float32 = real, imag, g-map (model input, model units); 'target' (X, Y, T, 2) float32 clean
real/imag in model units; 'clean', 'noisy' (X, Y, T, 2) in SNR units; 'scale' () float32: model units -> SNR units.
With `noise.snr_unit` (default) model units are SNR units and scale = 1; the ablation divides each sample by its
99th-percentile noisy magnitude instead (the model must then infer the noise level). Evaluation (train=False) always
draws the full pipeline (coil g-maps, SNR units) so every ablation is scored on the same held-out samples; a
no-g-map model gets g = 1 in its input channel.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from cinema_jax.config import get
from cinema_jax.data import noise as noise_lib
from cinema_jax.tasks.base import Task

FOV_MM = 256.0
SNR_NORM_PERCENTILE = 99.0


@functools.lru_cache(maxsize=64)
def render_slice(seed: int, index: int, view: str, slice_index: int, size: tuple, n_frames: int) -> np.ndarray:
    """Clean complex phantom plane (X, Y, T) complex64, magnitude <= 1 (max 1 per frame); cached per process
    (records are re-read). Only that plane is rendered (`phantom.render_complex_plane`)."""
    from cinema_jax.data import phantom

    nx, ny = size
    pcfg = phantom.PhantomConfig(lax_size=(nx, ny), lax_spacing=(FOV_MM / nx, FOV_MM / ny), sax_size=(nx, ny),
                                 sax_spacing=(FOV_MM / nx, FOV_MM / ny, 10.0), n_frames=n_frames)
    sub = phantom.sample_subject(seed, index, pcfg)
    out = phantom.render_complex_plane(sub, view, slice_index, cfg=pcfg)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1)).astype(np.complex64)  # (T, X, Y) -> (X, Y, T)


def noise_config(config, train: bool) -> dict:
    """Noise config for a sample: the config's `noise` for training; the full method for evaluation."""
    cfg = noise_lib.merge_config(get(config, "noise"))
    if not train:
        cfg["gmap_augment"], cfg["snr_unit"] = True, True
    return cfg


def to_model_units(noisy: np.ndarray, gmap: np.ndarray, config) -> tuple[np.ndarray, float]:
    """SNR-unit complex (X, Y, T) + g-map -> model input (X, Y, T, 3) and the scale back to SNR units."""
    gmap_on = bool(get(config, "noise.gmap_augment"))
    snr_unit = bool(get(config, "noise.snr_unit"))
    scale = 1.0
    if not snr_unit:
        scale = float(np.percentile(np.abs(noisy), SNR_NORM_PERCENTILE)) or 1.0
    g = gmap if gmap_on else np.ones_like(gmap)
    x = noisy / scale
    return np.stack([x.real, x.imag, g], axis=-1).astype(np.float32), scale


def _two(x: np.ndarray) -> np.ndarray:
    return np.stack([x.real, x.imag], axis=-1).astype(np.float32)


def _crop_starts(shape, crop, rng: np.random.Generator | None):
    starts = []
    for n, c in zip(shape, crop):
        c = min(c, n)
        starts.append(int(rng.integers(0, n - c + 1)) if rng is not None else (n - c) // 2)
    return starts


def noise_plan_sample(clean, g, rng: np.random.Generator, ncfg: dict, crop, shuffle_prob: float) -> dict:
    """A training sample whose noise the accelerator draws (`noise.on_device`; keys in `noise_device`): the host's
    draws up to the noise (g-map, level, filters), the cut-out, and the per-axis noise factors of that window."""
    plan = noise_lib.draw_noise_plan(clean, rng, ncfg, gmap=g)
    sx, sy, st = _crop_starts(clean.shape, crop, rng)
    cx, cy, ct = (min(c, n) for c, n in zip(crop, clean.shape))
    sl = (slice(sx, sx + cx), slice(sy, sy + cy), slice(st, st + ct))
    cl, gm = clean[sl] / plan["scale"], plan["gmap"][sl]
    lt = noise_lib.window_factor(plan["ft"], st, ct)
    if rng.random() < shuffle_prob:  # the frames and their noise rows move together
        order = rng.permutation(ct)
        cl, gm, lt = cl[..., order], gm[..., order], lt[order]
    return dict(clean=_two(cl), gmap=np.ascontiguousarray(gm, np.float32),
                noise_std=np.float32(plan["sigma"] / plan["scale"]),
                noise_lx=noise_lib.window_factor(plan["fx"], sx, cx),
                noise_ly=noise_lib.window_factor(plan["fy"], sy, cy), noise_lt=np.ascontiguousarray(lt))


def on_device(config) -> bool:
    """True when training samples leave the noise to the accelerator (`noise.on_device`)."""
    return bool(get(config, "noise.on_device"))


def loss_weights_from_config(config) -> tuple[tuple[str, float], ...]:
    """`config.loss` as sorted (name, weight) pairs (hashable: it is a field of the Linen model); unknown terms ->
    ConfigError."""
    weights = {str(k): float(v) for k, v in dict(get(config, "loss")).items()}
    unknown = sorted(set(weights) - set(DEFAULT_LOSS_WEIGHTS))
    if unknown:
        from cinema_jax.errors import ConfigError

        raise ConfigError(f"unknown loss term loss.{unknown[0]}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
    return tuple(sorted(weights.items()))


def make_denoise_model(size: str = "small", loss_weights: tuple = (), snr_unit: bool = True, **kwargs):
    """`imaging_transformer.make_model` returning a DenoisingModel that also carries the loss weights and the
    training inputs' units (for noise made on the accelerator)."""
    from cinema_jax.models.imaging_transformer import make_model

    base = make_model(size, **kwargs)
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__ if f not in ("parent", "name")}
    return _weighted_model_class()(loss_weights=tuple(loss_weights), snr_unit=bool(snr_unit), **fields)


@functools.cache
def _weighted_model_class():
    from cinema_jax.models.imaging_transformer import DenoisingModel

    class WeightedDenoisingModel(DenoisingModel):
        """DenoisingModel + `loss_weights` ((name, weight) pairs read by `DenoiseTask.loss`) + `snr_unit` (False:
        on-device noisy inputs are normalised per sample, the ablation); no params."""

        loss_weights: tuple = ()
        snr_unit: bool = True

    return WeightedDenoisingModel


class DenoiseTask(Task):
    """Task protocol implementation for SNRAware denoising (see module docstring for the sample layout)."""

    name = "denoise"
    eval_metric = "psnr"
    eval_mode = "max"

    # ---------------------------------------------------------------------------------------- model
    def make_model(self, config):
        """The imaging transformer of `config.model`; it also carries `config.loss` as `loss_weights` (the loop
        calls `loss(model, ...)` without the config, so the weights travel with the model; params are unaffected)."""
        import jax.numpy as jnp

        m = config.model
        over = dict(block_str=tuple(m.block_str) or None, width=m.width or None, heads=m.heads or None,
                    window=tuple(m.window), patch=tuple(m.patch), mixer_ratio=m.mixer_ratio, drop_path=m.drop_path,
                    image_size=tuple(get(config, "model.image_size")) or None,  # build (tile) size; () = the size's
                    conv=str(get(config, "conv")))
        if m.size == "tiny":  # tiny keeps its own window/patch unless the config changes them from the defaults
            over.pop("window") if tuple(m.window) == (8, 8) else None
            over.pop("patch") if tuple(m.patch) == (4, 4) else None
        dtype = jnp.bfloat16 if get(config, "precision") == "bfloat16" else jnp.float32
        weights = loss_weights_from_config(config)
        return make_denoise_model(m.size, backbone=m.backbone, dtype=dtype,
                                  remat=get(config, "remat"), loss_weights=weights,
                                  snr_unit=bool(get(config, "noise.snr_unit")), **over)

    # ---------------------------------------------------------------------------------------- data
    def records(self, config, split: str) -> list[dict]:
        d = config.data
        n = int(d.n_subjects[split])
        seed = int(config.seed) + {"train": 0, "val": 1000, "test": 2000}[split]
        out = []
        for i in range(n):
            for view in d.views:
                if view == "sax":
                    for k in range(int(d.sax_slices)):
                        out.append(dict(seed=seed, index=i, view=view, slice=3 + 2 * k))
                else:
                    out.append(dict(seed=seed, index=i, view=view, slice=0))
        return out

    def source(self, config, split: str):
        import grain

        from cinema_jax.errors import ConfigError

        if split not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {split!r}; use train, val or test")
        name = str(get(config, "data.source"))
        if name == "h5":
            from cinema_jax.data import sources

            return grain.MapDataset.source(sources.h5_source(config.data, split))
        if name != "synthetic":
            raise ConfigError(f"data.source={name!r} is unknown for denoising; choose from synthetic, h5")
        return grain.MapDataset.source(self.records(config, split))

    def transform(self, record, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        d = config.data
        if "image" in record:  # a real case (data.source h5): its own g-maps, (X, Y, 1 or T, N)
            clean, gmaps = np.asarray(record["image"], np.complex64), record.get("gmaps")
        else:
            clean = render_slice(int(record["seed"]), int(record["index"]), str(record["view"]),
                                 int(record["slice"]), tuple(int(v) for v in d.image_size), int(d.n_frames))
            gmaps = None
        ncfg = noise_config(config, train)
        if train and d.flip:
            if rng.random() < 0.5:
                clean = clean[::-1]
                gmaps = None if gmaps is None else gmaps[::-1]
            if rng.random() < 0.5:
                clean = clean[:, ::-1]
                gmaps = None if gmaps is None else gmaps[:, ::-1]
        g = None
        if gmaps is not None and ncfg["gmap_augment"]:  # one of the case's N maps, or (1 in N + 1) none: R = 1
            k = int(rng.integers(0, gmaps.shape[-1] + 1)) if train else 0
            g = gmaps[..., k] if k < gmaps.shape[-1] else np.ones(gmaps.shape[:3], np.float32)
        crop = tuple(int(v) for v in (d.crop if train else d.eval_crop))
        prob = float(get(d, "matrix_size_prob"))
        if train and prob > 0 and rng.random() < prob:  # no draw at prob 0: earlier runs' streams are unchanged
            fits = [r for r in d.matrix_size_ratios
                    if round(r * clean.shape[0]) >= crop[0] and round(r * clean.shape[1]) >= crop[1]]
            if fits:
                clean = noise_lib.adjust_matrix_size(clean, float(fits[int(rng.integers(len(fits)))]))
                if g is not None:  # the g-map follows linearly (the reference resizes its maps bilinearly)
                    g = np.stack([noise_lib.resize_map(g[..., t], *clean.shape[:2]) for t in range(g.shape[2])], -1)
        if clean.shape[2] < crop[2]:  # short series: repeat frames cyclically
            reps = math.ceil(crop[2] / clean.shape[2])
            clean = np.concatenate([clean] * reps, axis=2)
            g = np.concatenate([g] * reps, axis=2) if g is not None and g.shape[2] > 1 else g
        pad = [(0, max(c - n, 0)) for n, c in zip(clean.shape[:2], crop[:2])] + [(0, 0)]
        if any(p[1] for p in pad):  # smaller than the cut-out in-plane: mirror-pad, as the reference
            clean = np.pad(clean, pad, mode="symmetric")
            g = None if g is None else np.pad(g, pad, mode="symmetric")
        if g is not None:  # given map: skip drawing one (gmap_augment off here only stops the draw)
            g = np.broadcast_to(g, clean.shape).astype(np.float32)
            ncfg = dict(ncfg, gmap_augment=False)
        if train and ncfg["on_device"]:
            return noise_plan_sample(np.ascontiguousarray(clean), g, rng, ncfg, crop, float(d.frame_shuffle_prob))
        out = noise_lib.synthesize(np.ascontiguousarray(clean), rng, ncfg, gmap=g)
        sx, sy, st = _crop_starts(out["noisy"].shape, crop, rng if train else None)
        sl = (slice(sx, sx + crop[0]), slice(sy, sy + crop[1]), slice(st, st + crop[2]))
        noisy, cl, g = out["noisy"][sl], out["clean"][sl], out["gmap"][sl]
        if train and rng.random() < float(d.frame_shuffle_prob):
            order = rng.permutation(noisy.shape[2])
            noisy, cl, g = noisy[..., order], cl[..., order], g[..., order]
        if train and not get(config, "noise.snr_unit"):
            scale = float(np.percentile(np.abs(noisy), SNR_NORM_PERCENTILE)) or 1.0
            image = np.stack([noisy.real / scale, noisy.imag / scale, g], -1).astype(np.float32)
            noisy, cl = noisy / scale, cl / scale  # ablation: 'SNR units' of this sample are its own scale
            scale = 1.0
            target = _two(cl)
        else:
            image, scale = to_model_units(noisy, g, config)
            target = _two(cl / scale)
        return dict(image=image, target=target, clean=_two(cl), noisy=_two(noisy),
                    scale=np.float32(scale), sigma=np.float32(out["sigma"]))

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        """A training batch's keys and shapes (with `noise.on_device`: the noise plan; identity noise factors)."""
        cx, cy, ct = (int(v) for v in config.data.crop)
        z = lambda c: np.zeros((batch_size, cx, cy, ct, c), np.float32)
        ones = np.ones((batch_size,), np.float32)
        if on_device(config):
            eye = lambda n: np.broadcast_to(np.eye(n, dtype=np.complex64), (batch_size, n, n)).copy()
            return dict(clean=z(2), gmap=np.ones((batch_size, cx, cy, ct), np.float32), noise_std=ones,
                        noise_lx=eye(cx), noise_ly=eye(cy), noise_lt=eye(ct))
        return dict(image=z(3), target=z(2), clean=z(2), noisy=z(2), scale=ones, sigma=ones)

    def model_inputs(self, batch) -> dict:
        if "image" not in batch:  # a noise-plan batch (the model's input is made in the step)
            return {"image": np.zeros(np.shape(batch["clean"])[:-1] + (3,), np.float32)}
        return {"image": batch["image"]}

    # ---------------------------------------------------------------------------------------- loss
    def loss(self, model, params, batch, rng, train: bool, weights=None):
        """Weighted loss terms; weights: the argument, else the model's `loss_weights` (from `config.loss`, see
        `make_model`), else DEFAULT_LOSS_WEIGHTS."""
        import jax

        rngs = {"droppath": jax.random.fold_in(rng, 1), "dropout": jax.random.fold_in(rng, 2)} if train else {}
        if "noise_std" in batch:  # noise plan: the noisy input is drawn here, on the accelerator
            from cinema_jax.data import noise_device

            image, target = noise_device.model_inputs(batch, jax.random.fold_in(rng, 3),
                                                      snr_unit=bool(getattr(model, "snr_unit", True)))
        else:
            image, target = batch["image"], batch["target"]
        pred = model.apply({"params": params}, image, train=train, rngs=rngs)
        if weights is None:
            weights = dict(getattr(model, "loss_weights", ()) or ()) or DEFAULT_LOSS_WEIGHTS
        return combined_loss(pred, target, dict(weights))

    # ---------------------------------------------------------------------------------------- eval
    def predict(self, model, params, image):
        """Jitted forward (cached per model); image (B, X, Y, T, 3) -> (B, X, Y, T, 2)."""
        import jax

        key = id(model)
        fns = self.__dict__.setdefault("_predict_fns", {})
        if key not in fns:
            fns[key] = (model, jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)))
        return np.asarray(fns[key][1](params, image))

    def evaluate(self, model, params, batches, config) -> dict[str, float]:
        from cinema_jax.metrics.image import magnitude, psnr, ssim

        rows = []
        for batch in batches:
            pred = self.predict(model, params, np.asarray(batch["image"]))
            scale = np.asarray(batch["scale"]).reshape(-1)
            for i in range(pred.shape[0]):
                ref = magnitude(batch["clean"][i], True)
                out = magnitude(pred[i] * scale[i], True)
                noisy = magnitude(batch["noisy"][i], True)
                rng_ = float(ref.max())
                rows.append((psnr(out, ref, rng_), ssim(out, ref), psnr(noisy, ref, rng_), ssim(noisy, ref)))
        if not rows:
            return {}
        r = np.asarray(rows).mean(axis=0)
        return dict(psnr=float(r[0]), ssim=float(r[1]), psnr_noisy=float(r[2]), ssim_noisy=float(r[3]),
                    psnr_gain=float(r[0] - r[2]), ssim_gain=float(r[1] - r[3]), n=float(len(rows)))

    def eval_batches(self, config, split: str = "val", batch_size: int = 2, seed: int = 1234):
        """Deterministic held-out batches (full noise pipeline, fixed per-record rng) for benchmarks and tests."""
        recs = self.records(config, split)
        samples = [self.transform(r, np.random.default_rng([seed, i]), config, train=False) for i, r in enumerate(recs)]
        for s in range(0, len(samples), batch_size):
            chunk = samples[s:s + batch_size]
            yield {k: np.stack([c[k] for c in chunk]) for k in chunk[0]}

    def visualize(self, model, params, batch, rng, path) -> None:
        from cinema_jax import viz
        from cinema_jax.metrics.image import magnitude

        pred = self.predict(model, params, np.asarray(batch["image"][:1]))[0] * float(np.asarray(batch["scale"])[0])
        t = 0
        panels = [magnitude(batch["noisy"][0], True)[..., t], magnitude(pred, True)[..., t],
                  magnitude(batch["clean"][0], True)[..., t], np.asarray(batch["image"][0][..., t, 2])]
        viz.save_png(path, viz.image_grid([panels], titles=["noisy | denoised | clean | g-map"]))


# ------------------------------------------------------------------------------------------------------------ losses
# The reference sums MSE, perpendicular, VGG perceptual, Charbonnier and 3-D Gaussian-derivative losses with weight 1.
# Perceptual (ImageNet VGG) is replaced by a magnitude SSIM term (no pretrained VGG here). Inputs (B, X, Y, T, 2).
DEFAULT_LOSS_WEIGHTS = dict(mse=1.0, charbonnier=1.0, perpendicular=1.0, gaussian3d=1.0, ssim=1.0)


def _mag(x):
    import jax.numpy as jnp

    return jnp.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2 + 1e-12)


def charbonnier_loss(pred, target, eps=1e-3):
    """Complex Charbonnier: mean sqrt(|pred - target|^2 + eps^2)."""
    import jax.numpy as jnp

    d = pred - target
    return jnp.mean(jnp.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2 + eps * eps))


def perpendicular_loss(pred, target):
    """Phase-aware loss: distance of the target from the line through the prediction (|cross| / |pred|) when the
    two point the same way (cos angle >= 0), else 2|target| - that distance (penalises phase flips)."""
    import jax.numpy as jnp

    eps = 1e-6
    cross = jnp.abs(pred[..., 0] * target[..., 1] - pred[..., 1] * target[..., 0])
    p = cross / (_mag(pred) + eps)
    cos = pred[..., 0] * target[..., 0] + pred[..., 1] * target[..., 1]
    return jnp.mean(jnp.where(cos < 0, 2 * _mag(target) - p, p))


@functools.lru_cache(maxsize=8)
def _gauss_deriv_1d(sigma: float, halfwidth: int = 3) -> tuple[float, ...]:
    """First derivative of a Gaussian, 2*halfwidth+1 taps, normalised to unit L1 (the 3-D kernel is the product
    of this filter along x, y and t)."""
    x = np.arange(-halfwidth, halfwidth + 1, dtype=np.float64)
    g = -x / (sigma ** 3 * math.sqrt(2 * math.pi)) * np.exp(-x * x / (2 * sigma * sigma))
    return tuple(float(v) for v in g / np.abs(g).sum())


def _gauss_deriv_kernel(sigma_xy: float, sigma_t: float, halfwidth: int = 3) -> np.ndarray:
    """The 3-D first-derivative-of-Gaussian kernel (x, y, t), shape (7, 7, 7), zero mean (for tests/reference)."""
    d_xy, d_t = np.asarray(_gauss_deriv_1d(sigma_xy, halfwidth)), np.asarray(_gauss_deriv_1d(sigma_t, halfwidth))
    return np.einsum("i,j,k->ijk", d_xy, d_xy, d_t).astype(np.float32)


def _filter_axis(x, taps: tuple[float, ...], axis: int):
    """Zero-padded 'SAME' cross-correlation of x with 1-D `taps` along `axis` (shifted sums: fast on any backend)."""
    import jax.numpy as jnp

    h = len(taps) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (h, h)
    xp = jnp.pad(x, pad)
    n = x.shape[axis]
    return sum(t * jnp.take(xp, jnp.arange(j, j + n), axis=axis) for j, t in enumerate(taps) if t != 0.0)


def gaussian3d_loss(pred, target, sigmas=(0.5, 1.0, 1.25), sigmas_t=(0.5, 1.0, 1.25)):
    """L1 between 3-D Gaussian-derivative responses of the magnitudes (edge / motion structure), mean over scales.

    The kernel is separable, so it is applied as three 1-D filters (XLA's CPU 3-D conv of a 7^3 kernel is ~100x
    slower); the response is linear, so it is taken of the difference of the magnitudes."""
    import jax.numpy as jnp

    d = _mag(pred) - _mag(target)  # (B, X, Y, T)
    total = 0.0
    for s, st in zip(sigmas, sigmas_t):
        txy, tt = _gauss_deriv_1d(float(s)), _gauss_deriv_1d(float(st))
        r = _filter_axis(_filter_axis(_filter_axis(d, txy, 1), txy, 2), tt, 3)
        total = total + jnp.mean(jnp.abs(r))
    return total / len(sigmas)


def ssim_loss(pred, target, window: int = 11):
    """1 - SSIM of magnitudes per 2-D frame (uniform window, data range from the target batch)."""
    import jax
    import jax.numpy as jnp

    x, y = _mag(pred), _mag(target)
    w = min(window, x.shape[1], x.shape[2])
    rng_ = jnp.maximum(jnp.max(y) - jnp.min(y), 1e-6)
    c1, c2 = (0.01 * rng_) ** 2, (0.03 * rng_) ** 2
    pool = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, w, w, 1), (1, 1, 1, 1), "VALID") / (w * w)
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx * mx, pool(y * y) - my * my, pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return 1.0 - jnp.mean(s)


def combined_loss(pred, target, weights: dict):
    """Weighted sum of the terms named in `weights` (mse, charbonnier, perpendicular, gaussian3d, ssim)."""
    import jax.numpy as jnp

    fns = dict(mse=lambda p, t: jnp.mean((p - t) ** 2), charbonnier=charbonnier_loss,
               perpendicular=perpendicular_loss, gaussian3d=gaussian3d_loss, ssim=ssim_loss)
    parts, total = {}, 0.0
    for name, w in weights.items():
        if name not in fns:
            from cinema_jax.errors import ConfigError

            raise ConfigError(f"unknown loss term loss.{name}; known: {sorted(fns)}")
        if w:
            parts[name] = fns[name](pred, target)
            total = total + w * parts[name]
    return total, parts


def quick_train(config, steps: int | None = None, log_every: int = 0, params=None):
    """Minimal single-device AdamW loop over `transform(train=True)` samples, for benchmarks and the fast test.

    Why: a dependency-free way to measure the effect of the noise ablations on the same held-out set; production
    training goes through `cinema_jax.train.loop.train`. Returns (model, params, losses).
    """
    import jax
    import optax
    from flax import linen as nn

    task = DenoiseTask()
    model = task.make_model(config)
    steps = int(steps or config.total_steps)
    recs = task.records(config, "train")
    bs = int(config.batch_size)
    ex = task.example_batch(config, bs)
    if params is None:
        params = nn.meta.unbox(jax.jit(lambda: model.init({"params": jax.random.key(config.seed)},
                                                          **task.model_inputs(ex), train=False))()["params"])
    o = config.optim
    sched = optax.warmup_cosine_decay_schedule(0.0, o.lr, int(o.warmup_steps), max(steps, int(o.warmup_steps) + 1),
                                               o.min_lr)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.adamw(sched, o.b1, o.b2,
                                                                         weight_decay=o.weight_decay))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, key):
        (loss, parts), g = jax.value_and_grad(lambda p: task.loss(model, p, batch, key, True), has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for s in range(steps):
        idx = [(s * bs + j) for j in range(bs)]
        samples = [task.transform(recs[i % len(recs)], np.random.default_rng([int(config.seed), i]), config, True)
                   for i in idx]
        keys = ("image", "target") if "image" in samples[0] else tuple(samples[0])
        batch = {k: np.stack([c[k] for c in samples]) for k in keys}
        params, opt, loss = step(params, opt, batch, jax.random.key(s))
        losses.append(float(loss))
        if log_every and s % log_every == 0:
            print(f"step {s} loss {losses[-1]:.4f}", flush=True)
    return model, params, losses


TASK = DenoiseTask()
