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


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "regress"
    c.seed = 0
    c.total_steps = 5000
    c.batch_size = 64  # global batch per optimizer step (the reference's batch_size)
    c.log_every = 50
    c.checkpoint_every = 200
    c.eval_every = 200
    c.image_every = 0
    c.keep_checkpoints = 1
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.precision = "float32"
    c.remat = "none"
    c.attention = "explicit"  # softmax attention: explicit (head-major, hand-written grad) | xla | cudnn (GPU)
    c.conv = "auto"  # conv lowering: auto (tuned on CPU, xla on GPU/TPU) | tuned | xla (models.layers.Conv)
    c.grad_accum = 16  # reference: 4 per device x 16 accumulation = 64: micro-batches of 4
    c.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: stop with an error | skip the update (loop.py)
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-5, warmup_steps=100, weight_decay=0.05, b1=0.9,
                                             b2=0.95, clip_norm=5.0, layer_decay=0.75, schedule="cosine"))
    c.model = ml_collections.ConfigDict(dict(
        size="base", sax_size=(192, 192, 16), lax_size=(256, 256), patch_size=(4, 4, 1), scale_factor=(2, 2, 1),
        conv_chans=(64, 128), conv_n_blocks=2, reduce="all", out_chans=1, drop_path=0.1, dropout=0.1))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", view="sax", worker_count=0, seed=0, root="", path="", target="lv_ef",
        target_mean=50.0, target_std=18.0,  # phantom LV EF (%): phenotype ranges 15-85
        n_subjects=ml_collections.ConfigDict(dict(train=200, val=40, test=40)),
        phantom=ml_collections.ConfigDict(dict(sax_size=(192, 192), n_slices=16, sax_spacing=(1.0, 1.0, 10.0),
                                               n_frames=25)),
        sites=ml_collections.ConfigDict(dict(train=("A", "B", "C", "D"), val=("A", "B", "C", "D"),
                                             test=("A", "B", "C", "D"))),
        augment=ml_collections.ConfigDict(dict(target_spacing=1.25, normalise="zscore")),
        augment_train=True,
    ))
    c.init_from = ""
    c.freeze_encoder = False
    c.early_stopping = ml_collections.ConfigDict(dict(metric="mae", mode="min", patience=5, min_delta=1e-4))
    return c


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    c = _base()
    if arg == "smoke":
        c.total_steps = 30
        c.batch_size = 8  # divisible by 8 devices (CI simulates 8)
        c.grad_accum = 1
        c.log_every = 10
        c.checkpoint_every = 30
        c.eval_every = 15
        c.optim.lr = 1e-3
        c.optim.min_lr = 1e-4
        c.optim.warmup_steps = 5
        c.model.size = "tiny"
        c.model.conv_chans = (8, 16)  # = configs/mae_pretrain.py:smoke encoder
        c.model.conv_n_blocks = 1
        c.model.sax_size = (32, 32, 8)
        c.model.lax_size = (32, 32)
        c.model.drop_path = 0.0
        c.model.dropout = 0.0
        c.data.n_subjects = ml_collections.ConfigDict(dict(train=10, val=5, test=5))
        c.data.phantom = ml_collections.ConfigDict(dict(sax_size=(32, 32), n_slices=8, sax_spacing=(6.0, 6.0, 10.0),
                                                        lax_size=(32, 32), lax_spacing=(7.0, 7.0), n_frames=10))
        c.data.augment.target_spacing = 6.0
        c.data.augment.rotate_deg = 30.0
        c.early_stopping.patience = 0
        return c
    if arg == "synthetic":
        return c
    name, view = {"acdc": ("acdc", "sax"), "mnms": ("mnms", "sax"), "mnms2": ("mnms2", "sax"),
                  "mnms2_lax": ("mnms2", "lax_4c")}.get(arg, (None, None))
    if name is None:
        raise ValueError(f"unknown variant {arg!r}; use smoke, synthetic, acdc, mnms, mnms2 or mnms2_lax")
    c.data.source = "cinema_layout"
    c.data.view = view
    c.data.views = (view,)
    c.data.root = f"~/.cache/cinema_datasets/{name}/processed"
    c.data.target = "lv_ef"
    c.data.target_mean = 55.0
    c.data.target_std = 12.0
    c.data.augment.target_spacing = 1.0  # the layout is already on CineMA's 1 mm grid
    return c
