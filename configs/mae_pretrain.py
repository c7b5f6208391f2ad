"""CineMA MAE pretraining on the built-in synthetic cine CMR phantom.

Variants:
  smoke  tiny model, 32x32(x4) images, batch 8: the CI / laptop check (under 2 minutes on 2 CPU cores)
         .venv/bin/cinema-jax train --config=configs/mae_pretrain.py:smoke --workdir=runs/mae_smoke
  base   the paper recipe (../shared/docs/cinema.md §2): ViT-B, SAX 192x192x16 at 1x1x10 mm, LAX 256x256 at 1 mm,
         batch 64, 800 epochs, AdamW(0.9, 0.95) wd 0.05, lr 1e-3 with 10 warmup epochs then cosine to 1e-6,
         clip 5, mask ratio 0.75, bf16 compute, block remat
         cinema-jax train --config=configs/mae_pretrain.py:base --workdir=runs/mae_base
Sweep (mask ratio x lr x model size):
  `python launch/sweep.py --config=configs/mae_pretrain.py:base --workdir=runs/sweep`.
"""

import itertools

import ml_collections

from cinema_jax.data.phantom import VIEWS

from . import common


def _base() -> ml_collections.ConfigDict:
    c = common.base("pretrain_mae")
    c.image_every = 1000
    c.keep_checkpoints = 3
    c.precision = "bfloat16"
    c.remat = "block"
    c.data.update(dict(
        # synthetic | arrayrecord (data.path) | cinema_layout (data.root); tasks/pretrain_mae.py
        cine=False,  # cinema_layout: read '<pid>_<view>_t.nii.gz' cine files instead of ED/ES
        views=VIEWS,
        sax_size=(192, 192, 16),
        sax_spacing=(1.0, 1.0, 10.0),
        lax_size=(256, 256),
        lax_spacing=(1.0, 1.0),
        n_frames=25,
        n_subjects=ml_collections.ConfigDict(dict(train=4096, val=64, test=64)),
        phantom_seed=0,
        zoom_prob=0.5,
        zoom_range=(0.9, 1.1),
        worker_count=8,
        worker_buffer=2,
    ))
    c.model = ml_collections.ConfigDict(dict(
        size="base", patch_size=(4, 4, 1), scale_factor=(2, 2, 1), conv_chans=(64, 128), conv_n_blocks=2,
        mask_ratio=0.75, norm_target=False, drop_path=0.0,
    ))
    c.epochs = 800
    c.warmup_epochs = 10
    c.optim.min_lr = 1e-6
    _epochs_to_steps(c)
    return c


def _epochs_to_steps(c: ml_collections.ConfigDict) -> None:
    """Steps from epochs (one sample per subject per epoch, drop_remainder)."""
    per_epoch = max(int(c.data.n_subjects.train) // int(c.batch_size), 1)
    c.total_steps = int(c.epochs) * per_epoch
    c.optim.warmup_steps = int(c.warmup_epochs) * per_epoch


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = _base()
    if arg == "base":
        return c
    if arg != "smoke":
        raise ValueError(f"unknown variant {arg!r}; use smoke or base")
    c.batch_size = 8
    c.precision = "float32"
    c.remat = "none"
    c.data.sax_size = (32, 32, 4)
    c.data.sax_spacing = (6.0, 6.0, 20.0)  # ~192 mm in-plane FOV, 4 slices over 80 mm
    c.data.lax_size = (32, 32)
    c.data.lax_spacing = (8.0, 8.0)
    c.data.n_frames = 8
    c.data.n_subjects = ml_collections.ConfigDict(dict(train=64, val=8, test=8))
    c.data.worker_count = 0
    c.model.size = "tiny"
    c.model.conv_chans = (8, 16)
    c.model.conv_n_blocks = 1
    c.epochs = 8
    c.warmup_epochs = 1
    c.optim.lr = 3e-3
    c.optim.min_lr = 1e-5
    _epochs_to_steps(c)  # 64 steps
    c.log_every = 4
    c.checkpoint_every = 32
    c.eval_every = 32
    c.image_every = 32
    c.keep_checkpoints = 2
    return c


def get_sweep(arg: str = "base") -> list[dict]:
    """Mask ratio x lr x model size, as dotted-key overrides (expanded by launch/sweep.py)."""
    sizes = ["tiny", "base"] if arg == "smoke" else ["base", "large"]
    grid = itertools.product([0.6, 0.75, 0.9], [5e-4, 1e-3, 2e-3], sizes)
    return [{"model.mask_ratio": m, "optim.lr": lr, "model.size": s} for m, lr, s in grid]
