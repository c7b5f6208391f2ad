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


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "landmark"
    c.seed = 0
    c.total_steps = 4000
    c.batch_size = 64  # global batch per optimizer step (the reference's batch_size)
    c.log_every = 50
    c.checkpoint_every = 200
    c.eval_every = 200
    c.image_every = 200
    c.keep_checkpoints = 1
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.precision = "float32"
    c.remat = "none"
    c.attention = "explicit"  # softmax attention: explicit (head-major, hand-written grad) | xla | cudnn (GPU)
    c.conv = "auto"  # conv lowering: auto (tuned on CPU, xla on GPU/TPU) | tuned | xla (models.layers.Conv)
    c.grad_accum = 2  # reference: 32 per device x 2 accumulation = 64
    c.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: stop with an error | skip the update (loop.py)
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-5, warmup_steps=100, weight_decay=0.05, b1=0.9,
                                             b2=0.95, clip_norm=5.0, layer_decay=0.75, schedule="cosine"))
    c.model = ml_collections.ConfigDict(dict(
        kind="heatmap", size="base", lax_size=(256, 256), sax_size=(192, 192, 16), patch_size=(4, 4, 1),
        scale_factor=(2, 2, 1), conv_chans=(64, 128), conv_n_blocks=2, dec_chans=(32, 64, 128, 256, 512),
        dec_patch_size=(2, 2, 1), dec_scale_factor=(2, 2, 1), reduce="all", dropout=0.1, drop_path=0.1))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", view="lax_4c", worker_count=0, seed=0, root="", path="",
        n_subjects=ml_collections.ConfigDict(dict(train=200, val=20, test=20)),
        phantom=ml_collections.ConfigDict(dict(lax_size=(256, 256), lax_spacing=(1.0, 1.0), n_frames=25)),
        sites=ml_collections.ConfigDict(dict(train=("A", "B", "C", "D"), val=("A", "B", "C", "D"),
                                             test=("A", "B", "C", "D"))),
        # landmarks are orientation-specific (hinge 1 / 2): moderate rotations, no flips
        augment=ml_collections.ConfigDict(dict(target_spacing=1.0, normalise="zscore", flip_prob=0.0,
                                               rotate_deg=30.0)),
        augment_train=True,
    ))
    c.init_from = ""
    c.freeze_encoder = False
    c.early_stopping = ml_collections.ConfigDict(dict(metric="mean_distance", mode="min", patience=5,
                                                      min_delta=1e-4))
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.total_steps = 40
    c.batch_size = 8  # divisible by 8 devices (CI simulates 8)
    c.grad_accum = 1
    c.log_every = 10
    c.checkpoint_every = 40
    c.eval_every = 20
    c.image_every = 40
    c.optim.lr = 3e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 5
    c.model.size = "tiny"
    c.model.conv_chans = (8, 16)  # = configs/mae_pretrain.py:smoke encoder
    c.model.conv_n_blocks = 1
    c.model.lax_size = (32, 32)
    c.model.sax_size = (32, 32, 8)
    c.model.dec_chans = (4, 8, 8, 16, 16)
    c.model.dropout = 0.0
    c.model.drop_path = 0.0
    c.data.n_subjects = ml_collections.ConfigDict(dict(train=8, val=2, test=2))
    c.data.phantom = ml_collections.ConfigDict(dict(sax_size=(32, 32), n_slices=8, sax_spacing=(6.0, 6.0, 10.0),
                                                    lax_size=(32, 32), lax_spacing=(7.0, 7.0), n_frames=10))
    c.data.augment.target_spacing = 7.0
    c.early_stopping.patience = 0
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
