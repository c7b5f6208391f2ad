"""Segmentation fine-tuning (ConvUNetR, BG/RV/MYO/LV) from a CineMA MAE encoder.

Variants:
  smoke    CI-sized, synthetic phantom, tiny model whose encoder matches `configs/mae_pretrain.py:smoke`
           (`--config.init_from=<mae smoke workdir>` restores it). The demo runs this after MAE smoke pretraining.
  acdc, mnms, mnms2, mnms2_lax   CineMA processed layout (`cinema-jax data prepare ...`; set --config.data.root),
           paper settings: base model, layer decay 0.75, drop-path 0.1, dropout 0.1, Dice+CE, early stopping on
           val mean Dice (patience 5 evaluations, min_delta 1e-4), batch 4 (reference 4 x 16 accumulation).
  synthetic  base-sized model on the phantom at CineMA's grid (192 x 192 x 16, 1 mm), for GPU runs.
  sunnybrook fine-tune on part of Sunnybrook (data.subjects.train / val / test lists).

Data: `data.augment` holds the Chen 2019 pipeline (cinema_jax.data.augment.DEFAULTS keys); the in-plane crop is
always the model's input size. `data.augment_train=False` turns augmentation off (preprocessing is kept).
"""

import ml_collections

from . import common


def _base() -> ml_collections.ConfigDict:
    c = common.finetune(
        "segment",
        model=dict(out_chans=4, dec_chans=(32, 64, 128, 256, 512), dec_patch_size=(2, 2, 1),
                   dec_scale_factor=(2, 2, 1)),
        early_stopping=dict(metric="mean_dice", mode="max", patience=5, min_delta=1e-4),
        n_subjects=dict(train=64, val=16, test=16))
    c.total_steps = 20_000
    c.checkpoint_every = 1000
    c.eval_every = 1000
    c.image_every = 1000
    c.optim.warmup_steps = 500
    c.eval_hd95 = True
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny model + tiny phantom: a couple of minutes at most on 2 CPU cores."""
    common.smoke(c)
    c.total_steps = 120  # ~3 min on 2 CPU cores; mean Dice ~0.2 at 40 steps (LV only), ~0.5 at 120
    c.checkpoint_every = 60
    c.eval_every = 40
    c.image_every = 40
    c.optim.lr = 3e-3
    c.model.dec_chans = (4, 8, 8, 16, 16)
    c.data.n_subjects = ml_collections.ConfigDict(dict(train=8, val=2, test=2))
    return c


def layout(c: ml_collections.ConfigDict, name: str, view: str = "sax") -> ml_collections.ConfigDict:
    """CineMA processed layout (already at 1 mm in-plane, 192 / 256 px around the LV): keep the grid."""
    common.layout(c, name, view)
    c.total_steps = 4000 * 25 // 64  # ~ reference 4000 epochs of ~100 subjects x 2 phases / batch 64 (tuned by ES)
    c.eval_every = 200
    c.checkpoint_every = 200
    c.image_every = 200
    c.optim.warmup_steps = 50 * 2
    return c


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = _base()
    if arg == "smoke":
        return smoke(c)
    if arg in ("acdc", "mnms", "mnms2"):
        return layout(c, arg)
    if arg == "mnms2_lax":
        return layout(c, "mnms2", "lax_4c")
    if arg == "synthetic":
        return c
    if arg == "sunnybrook":
        c.data.source = "sunnybrook"
        c.data.root = "../shared/data/sunnybrook"
        c.data.mode = "volume"
        c.data.preprocess = False
        c.data.subjects = ml_collections.ConfigDict(dict(train=None, val=None, test=None))
        c.data.sunnybrook_train_ed_only = True  # ES contours lack the epicardium: MYO would be taught as background
        return c
    raise ValueError(f"unknown variant {arg!r}; use smoke, acdc, mnms, mnms2, mnms2_lax, synthetic or sunnybrook")
