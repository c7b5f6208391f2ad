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

FT_AUG = dict(target_spacing=1.25, normalise="zscore")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "segment"
    c.seed = 0
    c.total_steps = 20_000
    c.batch_size = 64  # global batch per optimizer step (the reference's batch_size)
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_every = 1000
    c.image_every = 1000
    c.keep_checkpoints = 1
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.precision = "float32"
    c.remat = "none"
    c.attention = "explicit"  # softmax attention: explicit (head-major, hand-written grad) | xla | cudnn (GPU)
    c.conv = "auto"  # conv lowering: auto (tuned on CPU, xla on GPU/TPU) | tuned | xla (models.layers.Conv)
    c.grad_accum = 16  # reference: 4 per device x 16 accumulation = 64: micro-batches of 4
    c.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: stop with an error | skip the update (loop.py)
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-5, warmup_steps=500, weight_decay=0.05, b1=0.9,
                                             b2=0.95, clip_norm=5.0, layer_decay=0.75, schedule="cosine"))
    c.model = ml_collections.ConfigDict(dict(
        size="base", sax_size=(192, 192, 16), lax_size=(256, 256), patch_size=(4, 4, 1), scale_factor=(2, 2, 1),
        conv_chans=(64, 128), conv_n_blocks=2, out_chans=4, dec_chans=(32, 64, 128, 256, 512),
        dec_patch_size=(2, 2, 1), dec_scale_factor=(2, 2, 1), dropout=0.1, drop_path=0.1))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", view="sax", worker_count=0, seed=0, root="", path="",
        n_subjects=ml_collections.ConfigDict(dict(train=64, val=16, test=16)),
        phantom=ml_collections.ConfigDict(dict(sax_size=(192, 192), n_slices=16, sax_spacing=(1.0, 1.0, 10.0),
                                               n_frames=25)),
        sites=ml_collections.ConfigDict(dict(train=("A", "B", "C", "D"), val=("A", "B", "C", "D"),
                                             test=("A", "B", "C", "D"))),
        augment=ml_collections.ConfigDict(dict(FT_AUG)),
        augment_train=True,
    ))
    c.init_from = ""
    c.freeze_encoder = False
    c.eval_hd95 = True
    c.early_stopping = ml_collections.ConfigDict(dict(metric="mean_dice", mode="max", patience=5, min_delta=1e-4))
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny model + tiny phantom: a couple of minutes at most on 2 CPU cores."""
    c.total_steps = 120  # ~3 min on 2 CPU cores; mean Dice ~0.2 at 40 steps (LV only), ~0.5 at 120
    c.batch_size = 8  # divisible by 8 devices (CI simulates 8)
    c.grad_accum = 1
    c.log_every = 10
    c.checkpoint_every = 60
    c.eval_every = 40
    c.image_every = 40
    c.optim.lr = 3e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 5
    c.model.size = "tiny"
    c.model.conv_chans = (8, 16)  # = configs/mae_pretrain.py:smoke encoder
    c.model.conv_n_blocks = 1
    c.model.sax_size = (32, 32, 8)
    c.model.lax_size = (32, 32)
    c.model.dec_chans = (4, 8, 8, 16, 16)
    c.model.dropout = 0.0
    c.model.drop_path = 0.0
    c.data.n_subjects = ml_collections.ConfigDict(dict(train=8, val=2, test=2))
    # 32 px x 6 mm = 192 mm field of view, 8 slices x 10 mm: the whole heart on a tiny grid
    c.data.phantom = ml_collections.ConfigDict(dict(sax_size=(32, 32), n_slices=8, sax_spacing=(6.0, 6.0, 10.0),
                                                    lax_size=(32, 32), lax_spacing=(7.0, 7.0), n_frames=10))
    c.data.augment.target_spacing = 6.0
    c.data.augment.rotate_deg = 30.0
    c.early_stopping.patience = 0
    return c


def layout(c: ml_collections.ConfigDict, name: str, view: str = "sax") -> ml_collections.ConfigDict:
    """CineMA processed layout (already at 1 mm in-plane, 192 / 256 px around the LV): keep the grid."""
    c.data.source = "cinema_layout"
    c.data.view = view
    c.data.views = (view,)
    c.data.root = f"~/.cache/cinema_datasets/{name}/processed"
    c.data.augment.target_spacing = 1.0
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
        return c
    raise ValueError(f"unknown variant {arg!r}; use smoke, acdc, mnms, mnms2, mnms2_lax, synthetic or sunnybrook")
