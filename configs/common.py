"""What the task configs share, defined once; each `configs/<task>.py` starts here and sets what is its own.

`base(task)`: the run-time block (seed, mesh, precision, remat, attention, conv, grad accumulation, the non-finite
policy), logging / checkpoint / eval cadence, AdamW + warmup-cosine, encoder init and freezing, early stopping and the
input pipeline's plumbing: every key the training loop and the pipeline read (`cinema_jax/train/loop.py`,
`cinema_jax/data/pipeline.py`), so each can be overridden on the command line.
`finetune(task, ...)`: the CineMA fine-tunes (segmentation, classification, regression, landmarks): reference batch 64
in micro-batches, layer decay 0.75, the phantom data with its sites, and the full Chen 2019 augmentation table.
`smoke(c)` / `layout(c, name, view)`: the CI-sized variant and the CineMA processed layout variant of a fine-tune.
`study(task, ...)` / `study_variant(c, arg)`: classification and regression (ConvViT on ED + ES of a study).

Config files import this as a sibling (`from . import common`): `cinema_jax.config.load_config` loads a config's
directory as a package.
"""

import ml_collections

from cinema_jax.data.augment import DEFAULTS as CHEN_DEFAULTS

SITES = ("A", "B", "C", "D")


def _cd(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def base(task: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 64  # global batch per optimizer step
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_every = 1000
    c.image_every = 0
    c.keep_checkpoints = 1
    c.eval_batch_size = 0  # 0 = batch_size
    c.eval_dir = ""  # '' = evaluation writes its per-sample CSV nowhere; `cinema-jax eval` writes eval_<split>.json
    c.mesh = _cd(data=-1, fsdp=1, tensor=1)  # -1: all remaining devices
    c.precision = "float32"  # compute dtype (params stay float32) | bfloat16
    c.remat = "none"  # none | block | dots | full
    c.attention = "explicit"  # softmax attention: explicit (head-major, hand-written grad) | xla | cudnn (GPU)
    c.conv = "auto"  # conv lowering: auto (tuned on CPU, xla on GPU/TPU) | tuned | xla (models.layers.Conv)
    c.grad_accum = 1
    c.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: stop with an error | skip the update (loop.py)
    c.optim = _cd(lr=1e-3, min_lr=1e-5, warmup_steps=100, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8,
                  clip_norm=5.0, layer_decay=0.0, schedule="cosine")  # AdamW; layer_decay 0 = off
    c.init_from = ""  # an MAE workdir / checkpoint whose encoder initialises the model
    c.freeze_encoder = False
    c.early_stopping = _cd(metric="loss", mode="min", patience=0, min_delta=0.0)
    c.data = _cd(
        source="synthetic", path="", root="",
        worker_count=0,  # Grain worker processes (0: in the main process)
        read_threads=1, prefetch=2, worker_buffer=1,  # Grain read threads / buffer, per-worker output buffer
        device_prefetch=2,  # batches sharded onto the mesh ahead of the step (train/prefetch.py)
    )
    return c


def finetune(task: str, model: dict, early_stopping: dict, **data) -> ml_collections.ConfigDict:
    """A CineMA fine-tune on the phantom at CineMA's grid with the reference's recipe (batch 64 = 4 x 16 micro-
    batches, layer decay 0.75, drop-path / dropout 0.1); `data` sets or adds data keys (view, phantom, ...)."""
    c = base(task)
    c.total_steps = 5000
    c.checkpoint_every = 200
    c.eval_every = 200
    c.grad_accum = 16  # reference: 4 per device x 16 accumulation = 64: micro-batches of 4
    c.optim.layer_decay = 0.75
    c.model = _cd(size="base", sax_size=(192, 192, 16), lax_size=(256, 256), patch_size=(4, 4, 1),
                  scale_factor=(2, 2, 1), conv_chans=(64, 128), conv_n_blocks=2, drop_path=0.1, dropout=0.1)
    c.model.update(model)
    augment = {**CHEN_DEFAULTS, "target_spacing": 1.25, "normalise": "zscore", **data.pop("augment", {})}
    c.data.update(dict(
        view="sax", seed=0,
        n_subjects=_cd(train=200, val=40, test=40),
        phantom=_cd(sax_size=(192, 192), n_slices=16, sax_spacing=(1.0, 1.0, 10.0), n_frames=25),
        sites=_cd(train=SITES, val=SITES, test=SITES),
        augment=ml_collections.ConfigDict(augment),  # cinema_jax.data.augment.DEFAULTS, every key overridable
        augment_train=True,  # False: preprocessing only (the 'without Chen' baseline)
    ))
    for key, value in data.items():
        c.data[key] = _cd(**value) if isinstance(value, dict) else value
    c.early_stopping = _cd(**early_stopping)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """CI-sized fine-tune: the tiny encoder of `configs/mae_pretrain.py:smoke` (restorable with `init_from`) on a
    32-px phantom (6 mm x 32 px = 192 mm field of view, 8 slices x 10 mm: the whole heart on a tiny grid)."""
    c.batch_size = 8  # divisible by 8 devices (CI simulates 8)
    c.grad_accum = 1
    c.log_every = 10
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 5
    c.model.size = "tiny"
    c.model.conv_chans = (8, 16)  # = configs/mae_pretrain.py:smoke encoder
    c.model.conv_n_blocks = 1
    c.model.sax_size = (32, 32, 8)
    c.model.lax_size = (32, 32)
    c.model.dropout = 0.0
    c.model.drop_path = 0.0
    c.data.phantom = _cd(sax_size=(32, 32), n_slices=8, sax_spacing=(6.0, 6.0, 10.0), lax_size=(32, 32),
                         lax_spacing=(7.0, 7.0), n_frames=10)
    c.data.augment.target_spacing = 6.0
    c.data.augment.rotate_deg = 30.0
    c.early_stopping.patience = 0
    return c


def layout(c: ml_collections.ConfigDict, name: str, view: str = "sax") -> ml_collections.ConfigDict:
    """The CineMA processed layout of `name` (`cinema-jax data prepare`; already at 1 mm in-plane, 192 / 256 px
    around the LV: the grid is kept). Set `--config.data.root` to where it lives."""
    c.data.source = "cinema_layout"
    c.data.view = view
    c.data.views = (view,)
    c.data.root = f"~/.cache/cinema_datasets/{name}/processed"
    c.data.augment.target_spacing = 1.0
    return c


STUDY_LAYOUTS = {"acdc": ("acdc", "sax"), "mnms": ("mnms", "sax"), "mnms2": ("mnms2", "sax"),
                 "mnms2_lax": ("mnms2", "lax_4c")}


def study(task: str, model: dict, early_stopping: dict, **data) -> ml_collections.ConfigDict:
    """A ConvViT study-level fine-tune (ED + ES in, one prediction per subject): classification and regression."""
    c = finetune(task, dict(reduce="all", **model), early_stopping, **data)
    c.image_every = 0
    return c


def study_variant(c: ml_collections.ConfigDict, arg: str) -> tuple[ml_collections.ConfigDict, str | None]:
    """Apply `smoke` or `synthetic`, or the layout of a dataset name; -> (config, the dataset name or None)."""
    if arg == "smoke":
        smoke(c)
        c.total_steps = 30
        c.checkpoint_every = 30
        c.eval_every = 15
        c.data.n_subjects = _cd(train=10, val=5, test=5)
        return c, None
    if arg == "synthetic":
        return c, None
    if arg not in STUDY_LAYOUTS:
        raise ValueError(f"unknown variant {arg!r}; use smoke, synthetic, {', '.join(STUDY_LAYOUTS)}")
    name, view = STUDY_LAYOUTS[arg]
    return layout(c, name, view), name
