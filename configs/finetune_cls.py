"""Disease classification fine-tuning (ConvViT on ED + ES) from a CineMA MAE encoder.

Variants:
  smoke    CI-sized, synthetic phantom phenotypes (NOR, DCM, HCM, MINF, ARV), tiny model whose encoder matches
           `configs/mae_pretrain.py:smoke` (`--config.init_from=<mae smoke workdir>`).
  acdc, mnms, mnms2, mnms2_lax   CineMA processed layout (`--config.data.root=...`), reference classes and
           settings: CE with label smoothing 0.1, layer decay 0.75, drop-path 0.1, early stopping on val MCC
           (patience 5 evaluations), batch 4 x 16 accumulation.
  synthetic  base-sized model on the phantom at CineMA's grid.
"""

import ml_collections

from . import common

CLASSES = {
    "acdc": ("DCM", "HCM", "MINF", "NOR", "RV"),
    "mnms": ("DCM", "HCM", "NOR", "ARV", "HHD"),
    "mnms2": ("ARR", "CIA", "FALL", "HCM", "LV", "NOR"),
}


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = common.study("classify", model={},
                     early_stopping=dict(metric="mcc", mode="max", patience=5, min_delta=1e-4),
                     target="phenotype", classes=("NOR", "DCM", "HCM", "MINF", "ARV"))
    c, name = common.study_variant(c, arg)
    if name is not None:
        c.data.target = "pathology"
        c.data.classes = CLASSES[name]
    return c
