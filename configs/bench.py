"""Benchmark configs for `python -m cinema_jax.bench --config=configs/bench.py:NAME` (see the cinema_jax/bench package).

Each benchmark embeds the task config it measures as `train` (loaded from configs/mae_pretrain.py, finetune_seg.py,
denoise.py), so the step timed is exactly the training loop's step for that config; `batch_size`, `precision`,
`remat`, `grad_accum` and `mesh` at the top level override the task config's values.

Names:
  mae_base        CineMA MAE-base train step at the paper's input sizes (SAX 192x192x16, LAX 256x256), all four views
  mae_tiny        the MAE smoke model (32x32x4 / 32x32, four views): quick checks
  mae_micro       one-view micro MAE (16x16 LAX): unit tests, fastest compile
  seg_sax_base    ConvUNetR-base SAX segmentation train step (192x192x16, Dice + CE), finetune_seg.py:synthetic
  seg_tiny        finetune_seg.py:smoke step
  denoise         SNRAware denoiser train step, denoise.py:paper (HRNet 'small', crop 64x64x16), float32, remat block
  denoise_tiny    denoise.py:smoke step
  synth_data      pretraining samples/s per worker: the pretrain_mae transform (phantom render of four views of one
                  frame at the paper's sizes + zoom + scaling), in one process = one Grain worker
  synth_tiny      the same at smoke sizes
  record_data     the same sample read from pre-rendered ArrayRecord cine records (one frame of each view decoded)
  record_tiny     the same at smoke sizes
  noise_pipeline  SNRAware training samples/s per worker: denoise transform (render + SNR-unit noise + crop)
  noise_tiny      the same at smoke sizes
  noise_h5        the same transform on the reference's HDF5 cases (`denoise.py:h5`; written to a temp file:
                  data.h5_cases cases of data.h5_case_shape complex, 2 g-maps each)
  noise_h5_tiny   the same at smoke sizes
  memory_fit      largest MAE size x batch per device under FSDP over 8 devices within memory.budget_bytes
  memory_fit_tiny the same search on the smoke model (tests)
  scaling         weak / strong scaling over 1/2/4/8 simulated CPU devices + 2 local processes (jax.distributed)
  scaling_tiny    the same on the micro model (tests)
Profile: `--config.profile_dir=DIR` traces one more step (after the timed ones) and adds `profile`: per-op time by
kind, phase and model scope (`cinema_jax/step_profile.py`; the Perfetto trace stays in DIR).
Overrides: `--config.batch_size=4 --config.precision=bfloat16 --config.remat=block --config.train.model.size=large`.
"""

from pathlib import Path

import ml_collections

HERE = Path(__file__).resolve().parent


def _task(spec: str, overrides=()) -> ml_collections.ConfigDict:
    from cinema_jax.config import apply_overrides, load_base

    return apply_overrides(load_base(str(HERE / spec)), list(overrides))


MICRO = ("data.views=('lax_4c',)", "data.lax_size=(16,16)", "model.conv_n_blocks=1")


def _common(name: str, mode: str, train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.mode = mode  # 'train_step' | 'synth_data' | 'record_data' | 'noise_pipeline' | 'memory_fit' | 'scaling'
    c.seed = 0
    c.batch_size = 2  # global batch
    c.precision = "float32"
    c.remat = "none"
    c.attention = "explicit"  # explicit | xla | cudnn (see models.layers.attention)
    c.conv = "auto"  # auto | tuned | xla (see models.layers.resolve_conv_impl); tasks without convs ignore it
    c.grad_accum = 1
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.n_devices = 0  # 0 = all visible devices
    c.warmup_steps = 2  # untimed steps after compilation
    c.timed_steps = 5  # median over these
    c.matmul_size = 2048  # square matmul for the peak-FLOP/s reference (per device)
    c.matmul_reps = 10  # the peak is the fastest call, measured before and after the timed steps
    c.hlo_stats = True  # count collectives in the compiled HLO
    c.collective_probe = True  # time an isolated all-reduce of the step's collective volume (multi-device)
    c.profile_dir = ""  # train_step: trace one more step here and add a per-op summary (cinema_jax.step_profile)
    c.profile_depth = 3  # module names kept in the summary's scopes
    c.train = train
    c.data = ml_collections.ConfigDict(dict(n_samples=8, warmup_samples=1, consumer_samples_per_s=0.0,
                                            record_subjects=6, frame_records=True))
    c.memory = ml_collections.ConfigDict(dict(sizes=("base", "large", "huge"), budget_bytes=80 * 10**9,
                                              fsdp=8, max_batch_per_device=64, check=True))
    c.scaling = ml_collections.ConfigDict(dict(device_counts=(1, 2, 4, 8), weak_batch_per_device=2,
                                               strong_global_batch=8, processes=2, timeout_s=1800, port=0))
    return c


def get_config(name: str = "mae_base") -> ml_collections.ConfigDict:
    if name == "mae_base":
        return _common(name, "train_step", _task("mae_pretrain.py:base"))
    if name == "mae_tiny":
        c = _common(name, "train_step", _task("mae_pretrain.py:smoke"))
        c.matmul_size, c.warmup_steps = 256, 1
        return c
    if name == "mae_micro":
        c = _common(name, "train_step", _task("mae_pretrain.py:smoke", MICRO))
        c.matmul_size, c.warmup_steps = 256, 1
        return c
    if name == "seg_sax_base":
        return _common(name, "train_step", _task("finetune_seg.py:synthetic"))
    if name == "seg_tiny":
        c = _common(name, "train_step", _task("finetune_seg.py:smoke"))
        c.matmul_size, c.warmup_steps = 256, 1
        return c
    if name == "denoise":
        c = _common(name, "train_step", _task("denoise.py:paper"))
        c.remat = "block"  # without it batch 2 needs ~18-20 GB of temp: the edge of a 23 GiB CPU box (notes/perf.md)
        return c
    if name == "denoise_tiny":
        c = _common(name, "train_step", _task("denoise.py:smoke"))
        c.matmul_size, c.warmup_steps = 256, 1
        return c
    if name in ("synth_data", "synth_tiny"):
        c = _common(name, "synth_data", _task("mae_pretrain.py:" + ("base" if name == "synth_data" else "smoke")))
        c.data.n_samples = 6 if name == "synth_data" else 3
        return c
    if name in ("record_data", "record_tiny"):
        c = _common(name, "record_data", _task("mae_pretrain.py:" + ("base" if name == "record_data" else "smoke")))
        c.data.n_samples = 24 if name == "record_data" else 3
        c.data.record_subjects = 6 if name == "record_data" else 2
        return c
    if name in ("noise_pipeline", "noise_tiny"):
        c = _common(name, "noise_pipeline", _task("denoise.py:" + ("paper" if name == "noise_pipeline" else "smoke")))
        c.data.n_samples = 12 if name == "noise_pipeline" else 3
        return c
    if name in ("noise_h5", "noise_h5_tiny"):
        tiny = name == "noise_h5_tiny"
        c = _common(name, "noise_pipeline", _task("denoise.py:h5", ("data.path=''",)))
        c.data.n_samples = 3 if tiny else 24
        c.data.h5_cases = 2 if tiny else 8
        c.data.h5_case_shape = (40, 36, 6) if tiny else (256, 208, 30)  # x, y, frames
        if tiny:
            c.train.data.crop = (32, 32, 8)
        return c
    if name == "memory_fit":
        c = _common(name, "memory_fit", _task("mae_pretrain.py:base"))
        c.precision, c.remat = "bfloat16", "block"
        c.conv = "xla"  # the lowering 'auto' picks on the accelerators this estimates (the CPU-tuned one: conv=tuned)
        return c
    if name == "memory_fit_tiny":
        c = _common(name, "memory_fit", _task("mae_pretrain.py:smoke", MICRO))
        c.memory.sizes = ("tiny",)
        c.memory.budget_bytes = 370_000  # binds at ~5 per device: the search brackets the fit with compiles
        c.memory.max_batch_per_device = 8
        return c
    if name == "scaling":
        # the MAE smoke model (4 views, 32x32(x4), tiny ViT) so the 10 compiles fit in minutes on 2 shared cores;
        # a larger model: --config.train.data.sax_size=(64,64,8) --config.train.data.lax_size=(64,64) ...
        c = _common(name, "scaling", _task("mae_pretrain.py:smoke"))
        c.matmul_size, c.warmup_steps = 512, 1
        return c
    if name == "scaling_tiny":
        c = _common(name, "scaling", _task("mae_pretrain.py:smoke", MICRO))
        c.scaling.update(dict(device_counts=(1, 2), weak_batch_per_device=1, strong_global_batch=2, processes=0))
        c.matmul_size, c.warmup_steps = 128, 1
        return c
    raise ValueError(f"unknown benchmark {name!r}; see the configs/bench.py docstring")
