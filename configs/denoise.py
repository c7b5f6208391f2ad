"""SNRAware denoising: `smoke` (CI-sized), `paper` (reference settings on the phantom), `h5` (the reference recipe on
its HDF5 training files, `--config.data.path=...`); ablation switches and a sweep.

Ablations (issue 5): `noise.gmap_augment=False` (g = 1 everywhere, the model never sees a g-map) and
`noise.snr_unit=False` (no SNR-unit scaling: each sample is normalised by its 99th-percentile magnitude instead).
Usage: `cinema-jax train --config=configs/denoise.py:smoke --config.noise.gmap_augment=False`.
"""

import ml_collections

from cinema_jax.data.noise import DEFAULTS as NOISE_DEFAULTS

from . import common


def _base() -> ml_collections.ConfigDict:
    c = common.base("denoise")
    c.total_steps = 100_000
    c.batch_size = 8
    c.log_every = 100
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.image_every = 5000
    c.keep_checkpoints = 3
    # reference: Sophia + OneCycle, lr 1e-5 (override), weight decay 0; we use AdamW with warmup + cosine
    c.optim.update(dict(lr=1e-4, min_lr=1e-6, warmup_steps=1000, weight_decay=0.0, b2=0.99, clip_norm=1.0))
    c.model = ml_collections.ConfigDict(dict(size="small", backbone="hrnet", block_str=(), width=0, heads=0,
                                             window=(8, 8), patch=(4, 4), mixer_ratio=4.0, drop_path=0.1,
                                             image_size=()))  # () = the size's build/tile size (small: 64x64)
    c.data.update(dict(  # source: synthetic (phantom) | h5 (the reference's HDF5 cases, data.path; variant `h5`)
        views=("lax_2c", "lax_3c", "lax_4c", "sax"),  # sax: the middle `sax_slices` slices are used
        sax_slices=3,
        n_subjects=ml_collections.ConfigDict(dict(train=400, val=16, test=16)),
        image_size=(192, 192),  # phantom matrix (X, Y); spacing chosen so the FOV is ~300 mm
        n_frames=25,
        crop=(64, 64, 16),  # reference cutout [H, W, T]
        eval_crop=(128, 128, 16),
        frame_shuffle_prob=0.1,
        flip=True,
        # reference: re-acquire at another matrix (same FOV) before the noise; ratios too small for the crop skipped
        matrix_size_ratios=(0.5, 0.75, 1.0, 1.25, 1.5),
        matrix_size_prob=0.5,
    ))
    # noise synthesis: every key of cinema_jax.data.noise.DEFAULTS (each overridable); the phantom is noise-free ->
    # clean_noise_std 0 and the SNR (of the 95th-percentile magnitude) is drawn directly
    c.noise = ml_collections.ConfigDict({**NOISE_DEFAULTS, **dict(
        snr_range=(2.0, 40.0), clean_noise_std=0.0, gmap_augment=True, snr_unit=True,
        acceleration=(1, 2, 3, 4), prob_apply_filter_t=0.2,
        on_device=True,  # training noise drawn in the jitted step from the host's plan (cinema_jax.data.noise_device)
    )})
    c.loss = ml_collections.ConfigDict(dict(mse=1.0, charbonnier=1.0, perpendicular=1.0, gaussian3d=1.0, ssim=1.0))
    c.early_stopping.update(dict(metric="psnr", mode="max"))
    return c


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = _base()
    if arg == "paper":
        c.batch_size = 1 * 8  # reference: batch 1 per GPU
        c.precision = "bfloat16"
        c.optim.lr = 1e-5
        return c
    if arg == "h5":  # the reference recipe on its HDF5 training files: --config.data.path=DIR_OR_PATTERN
        c.batch_size = 1 * 8
        c.precision = "bfloat16"
        c.optim.lr = 1e-5
        c.data.source = "h5"
        c.data.worker_count = 8
        c.noise.snr_range = ()  # sigma ~ U[min_noise_level, max_noise_level) in the clean image's SNR units
        c.noise.clean_noise_std = 1.0  # real images already carry unit noise
        return c
    if arg != "smoke":
        raise ValueError(f"unknown variant {arg!r}; use smoke, paper or h5")
    c.total_steps = 150
    c.batch_size = 4
    c.log_every = 10
    c.checkpoint_every = 150
    c.eval_every = 150
    c.image_every = 150
    c.keep_checkpoints = 1
    c.optim.lr = 2e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 10
    c.model.size = "tiny"
    c.model.block_str = ("T1L1G1",)
    c.model.mixer_ratio = 2.0
    c.model.drop_path = 0.0
    c.data.views = ("lax_2c", "lax_3c", "lax_4c")
    c.data.n_subjects = ml_collections.ConfigDict(dict(train=6, val=2, test=2))
    c.data.image_size = (64, 64)
    c.data.n_frames = 8
    c.data.crop = (32, 32, 8)
    c.data.eval_crop = (64, 64, 8)
    c.data.matrix_size_prob = 0.0  # the README's smoke ablation table was measured without it
    c.noise.on_device = False  # ... and with the noise made on the host (the same law, another random stream)
    c.noise.snr_range = (2.0, 12.0)
    return c


def get_sweep(arg: str = "smoke") -> list[dict]:
    """Ablation sweep: full method, no g-map augmentation, no SNR-unit scaling (dotted-key overrides)."""
    del arg
    return [
        {"noise.gmap_augment": True, "noise.snr_unit": True},
        {"noise.gmap_augment": False, "noise.snr_unit": True},
        {"noise.gmap_augment": True, "noise.snr_unit": False},
    ]
