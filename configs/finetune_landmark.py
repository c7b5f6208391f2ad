"""LAX landmark fine-tuning (mitral hinges + apex) from a CineMA MAE encoder: heatmap or coordinate model.

Variants:
  smoke            CI-sized heatmap model on synthetic LAX 4C, encoder matching `configs/mae_pretrain.py:smoke`.
  smoke_coordinate the same with the ConvViT coordinate head (Wing loss).
  heatmap, coordinate   base-sized models on the phantom at CineMA's LAX grid (256 x 256, 1 mm); reference settings:
                   layer decay 0.75, drop-path 0.1, dropout 0.1, early stopping on val mean distance (mm).
  arrayrecord      a prepared ArrayRecord dataset with '<view>_{ed,es}_landmarks' (`--config.data.path=...`).
(The reference's landmark data is private, so there is no public-layout variant; ACDC/M&Ms have no landmarks.)
"""

import ml_collections

from . import common


def _base() -> ml_collections.ConfigDict:
    c = common.finetune(
        "landmark",
        model=dict(kind="heatmap", dec_chans=(32, 64, 128, 256, 512), dec_patch_size=(2, 2, 1),
                   dec_scale_factor=(2, 2, 1), reduce="all"),
        early_stopping=dict(metric="mean_distance", mode="min", patience=5, min_delta=1e-4),
        view="lax_4c", n_subjects=dict(train=200, val=20, test=20),
        phantom=dict(lax_size=(256, 256), lax_spacing=(1.0, 1.0), n_frames=25),
        # landmarks are orientation-specific (hinge 1 / 2): moderate rotations, no flips
        augment=dict(target_spacing=1.0, flip_prob=0.0, rotate_deg=30.0))
    c.total_steps = 4000
    c.image_every = 200
    c.grad_accum = 2  # reference: 32 per device x 2 accumulation = 64
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    common.smoke(c)
    c.total_steps = 40
    c.checkpoint_every = 40
    c.eval_every = 20
    c.image_every = 40
    c.optim.lr = 3e-3
    c.model.dec_chans = (4, 8, 8, 16, 16)
    c.data.n_subjects = ml_collections.ConfigDict(dict(train=8, val=2, test=2))
    c.data.augment.target_spacing = 7.0
    c.data.augment.rotate_deg = 30.0
    return c


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = _base()
    if arg == "smoke":
        return smoke(c)
    if arg == "smoke_coordinate":
        c = smoke(c)
        c.model.kind = "coordinate"
        return c
    if arg in ("heatmap", "coordinate"):
        c.model.kind = arg
        return c
    if arg == "arrayrecord":
        c.data.source = "arrayrecord"
        c.data.path = ""
        return c
    raise ValueError(f"unknown variant {arg!r}; use smoke, smoke_coordinate, heatmap, coordinate or arrayrecord")
