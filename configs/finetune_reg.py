"""EF regression fine-tuning (ConvViT on ED + ES, MSE on z-scored targets) from a CineMA MAE encoder.

Variants:
  smoke    CI-sized, synthetic phantom LV EF (voxel-count definition), tiny model whose encoder matches
           `configs/mae_pretrain.py:smoke` (`--config.init_from=<mae smoke workdir>`).
  acdc, mnms, mnms2, mnms2_lax   CineMA processed layout (`--config.data.root=...`), target `lv_ef` (%) z-scored
           with data.target_mean / target_std (set them to the train split's statistics; the reference's constants
           follow the buggy EF of CineMA issue #30 and are NOT used), layer decay 0.75, drop-path 0.1, early stopping
           on val MAE (patience 5 evaluations), batch 4 x 16 accumulation.
  synthetic  base-sized model on the phantom at CineMA's grid.
"""

import ml_collections

from . import common


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = common.study("regress", model=dict(out_chans=1),
                     early_stopping=dict(metric="mae", mode="min", patience=5, min_delta=1e-4),
                     target="lv_ef", target_mean=50.0, target_std=18.0)  # phantom LV EF (%): phenotypes 15-85
    c, name = common.study_variant(c, arg)
    if name is not None:
        c.data.target = "lv_ef"
        c.data.target_mean = 55.0
        c.data.target_std = 12.0
    return c
