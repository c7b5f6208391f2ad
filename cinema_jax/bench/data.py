"""The data benchmarks: host samples/s per Grain worker of the pretraining sample rendered by the phantom
(`synth_data`) or read from ArrayRecord cine records (`record_data`), and of the denoiser's sample
(`noise_pipeline`), against the rate the accelerator consumes.

Why a module of its own: these time numpy workers, not a jitted step; they share only the rate helpers below.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _rate(fn, n: int, warmup: int) -> tuple[float, float]:
    """(samples/s, seconds/sample) of calling fn(i) for i in range(warmup, warmup + n) after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + n):
        fn(i)
    dt = time.perf_counter() - t0
    return n / dt, dt / n


def _grain_rate(transform, n: int, warmup: int, seed: int) -> float:
    """samples/s of a Grain MapDataset random_map pipeline consumed in this process (one worker)."""
    import grain
    import numpy as np

    ds = grain.MapDataset.range(warmup + n).random_map(lambda i, rng: transform(int(i), rng), seed=seed)
    for i in range(warmup):
        ds[i]
    t0 = time.perf_counter()
    for i in range(warmup, warmup + n):
        ds[i]
    del np
    return n / (time.perf_counter() - t0)


def _consumer(config, out: dict) -> None:
    need = float(config.data.consumer_samples_per_s)
    if need > 0:
        out["consumer_samples_per_s"] = need
        out["ratio_vs_consumer_per_worker"] = out["samples_per_s_per_worker"] / need
        out["workers_for_3x"] = math.ceil(3 * need / out["samples_per_s_per_worker"])


def _task_rates(config, task, record_fn, extra_fn=None) -> dict[str, Any]:
    """Per-worker samples/s of `task.transform` on fresh training records: direct calls and through Grain."""
    import numpy as np

    tc = config.train

    def one(i: int, rng=None):
        return task.transform(record_fn(i), rng if rng is not None else np.random.default_rng(i), tc, True)

    n, w = int(config.data.n_samples), int(config.data.warmup_samples)
    rate, per = _rate(one, n, w)
    grain_rate = _grain_rate(lambda i, rng: one(i + 10_000, rng), n, w, int(config.seed))
    sample = one(0)
    nbytes = sum(np.asarray(v).nbytes for v in sample.values())
    return {"samples_per_s": rate, "samples_per_s_per_worker": rate, "seconds_per_sample": per,
            "grain_samples_per_s_per_worker": grain_rate, "bytes_per_sample": int(nbytes), "n_samples": n,
            "sample_shapes": {k: list(np.shape(v)) for k, v in sample.items()}}


def _host_device() -> dict:
    return {"platform": "host", "kind": "cpu (numpy worker)", "count": 1, "host_cpus": os.cpu_count()}


def run_synth_data(config) -> dict[str, Any]:
    from cinema_jax.tasks.pretrain_mae import PretrainMAE

    task = PretrainMAE()
    tc = config.train
    out = {"name": config.name, "mode": "synth_data", "device": _host_device(), "batch_size": 1,
           "sample": "pretrain_mae transform: phantom render of all views of one frame + zoom + min-max scaling",
           "views": list(tc.data.views), "sax_size": list(tc.data.sax_size), "lax_size": list(tc.data.lax_size)}
    # distinct subjects (index >= 1000) so no cache of a previous sample helps
    out.update(_task_rates(config, task, lambda i: {"seed": 12345, "index": 1000 + i}))
    _consumer(config, out)
    return out


def run_record_data(config) -> dict[str, Any]:
    """The pretraining sample from ArrayRecord cine records (the pre-rendered alternative to the phantom)."""
    import tempfile

    from cinema_jax.data.arrayrecord import ArrayRecordSource, frame_of, frames_path, write_arrayrecord
    from cinema_jax.data.synthetic import synthetic_record
    from cinema_jax.tasks.pretrain_mae import PretrainMAE, phantom_config

    task = PretrainMAE()
    tc = config.train
    views = tuple(tc.data.views)
    pcfg = phantom_config(tc)
    n_rec = int(config.data.record_subjects)
    keys = [f"{v}_t" for v in views]

    def records():  # what a UK Biobank-style pretraining record holds: the cine of every view and its spacing
        for i in range(n_rec):
            r = synthetic_record(12345, 1000 + i, pcfg, views, cine=True)
            yield {"pid": r["pid"], **{k: r[k] for k in keys}, **{f"{v}_spacing": r[f"{v}_spacing"] for v in views}}

    out = {"name": config.name, "mode": "record_data", "device": _host_device(), "batch_size": 1,
           "sample": "pretrain_mae transform on ArrayRecord cine records: read + decode one frame of every view "
                     "(uint8 -> float32) + zoom + min-max scaling; the file is in the page cache (no storage I/O)",
           "views": views, "sax_size": list(tc.data.sax_size), "lax_size": list(tc.data.lax_size),
           "n_frames": int(pcfg.n_frames), "records": n_rec}
    with tempfile.TemporaryDirectory(prefix="cinema_bench_") as tmp:
        path = Path(tmp) / "train.array_record"
        frame_records = bool(config.data.frame_records)
        write_arrayrecord(path, records(), quantize=keys, frames=keys, frame_records=frame_records)
        size = path.stat().st_size + (frames_path(path).stat().st_size if frame_records else 0)
        out["bytes_per_record"] = int(size // n_rec)
        out["layout"] = "frame records (companion file)" if frame_records else "frames inline (one member each)"
        src = ArrayRecordSource(path)
        tc.data.source = "arrayrecord"
        for i in range(n_rec):  # first touch of each record (page faults of the fresh file) outside the timing
            src[i]

        def read_decode(i: int):
            rec = src[i % n_rec]
            return [frame_of(rec[k], i % pcfg.n_frames) for k in keys]

        rate, per = _rate(read_decode, int(config.data.n_samples), int(config.data.warmup_samples))
        out["read_decode_samples_per_s"], out["read_decode_seconds_per_sample"] = rate, per
        out.update(_task_rates(config, task, lambda i: src[i % n_rec]))
    _consumer(config, out)
    return out


def run_noise_pipeline(config) -> dict[str, Any]:
    """Denoiser training samples per host worker, with the noise made on the accelerator from the host's plan
    (`noise.on_device`, the paper config's default) and, for comparison, all on the host."""
    import copy

    import numpy as np

    from cinema_jax.data import noise as noise_lib
    from cinema_jax.tasks import denoise as dn

    task = dn.DenoiseTask()
    tc = config.train
    d = tc.data
    views = tuple(d.views)
    h5 = str(d.get("source", "synthetic")) == "h5"
    if h5:  # the reference's HDF5 layout, read back by the task's own source on every sample
        tmp = tempfile.TemporaryDirectory()
        _write_h5_cases(Path(tmp.name) / "train.h5", int(config.data.h5_cases), tuple(config.data.h5_case_shape))
        tc.data.path = tmp.name
        source = task.source(tc, "train")

        def record(i: int) -> dict:
            return source[i % len(source)]
    else:
        def record(i: int) -> dict:  # a new subject every sample: the per-process render cache never hits
            view = views[i % len(views)]
            return {"seed": 12345, "index": 1000 + i, "view": view, "slice": 5 if view == "sax" else 0}

    on_device = dn.on_device(tc)
    what = ("read an HDF5 case + one of its g-maps" if h5 else "phantom render of a complex 2D+T slice + g-map")
    out = {"name": config.name, "mode": "noise_pipeline", "device": _host_device(), "batch_size": 1,
           "sample": f"denoise transform: {what} + "
                     + ("noise plan (level, filters, per-axis window factors; the noise is drawn in the step)"
                        if on_device else "coloured noise in SNR units") + " + crop",
           "noise_on_device": on_device, "crop": list(d.crop)}
    if h5:
        out.update(source="h5", case_shape=list(config.data.h5_case_shape), cases=int(config.data.h5_cases))
    else:
        out.update(source="synthetic", image_size=list(d.image_size), n_frames=int(d.n_frames))
    out.update(_task_rates(config, task, record))
    flipped = copy.deepcopy(config)
    flipped.train.noise.on_device = not on_device
    other = _task_rates(flipped, task, lambda i: record(i + 100_000))  # other subjects: no cache hits
    out["other_path"] = {"noise_on_device": not on_device,
                         **{k: other[k] for k in ("samples_per_s_per_worker", "grain_samples_per_s_per_worker")}}
    # the noise alone (plan or synthesis) + crop on an already rendered series (cache hit / real data in memory)
    if h5:
        clean = np.asarray(record(0)["image"], np.complex64)
        tmp.cleanup()
    else:
        clean = dn.render_slice(12345, 0, views[0], 0, tuple(int(v) for v in d.image_size), int(d.n_frames))
    crop = tuple(int(v) for v in d.crop)
    if clean.shape[2] < crop[2]:
        clean = np.concatenate([clean] * math.ceil(crop[2] / clean.shape[2]), axis=2)
    ncfg = dn.noise_config(tc, True)

    def noise_only(i: int):
        o = noise_lib.synthesize(clean, np.random.default_rng(i), ncfg)
        return o["noisy"][: crop[0], : crop[1], : crop[2]]

    def plan_only(i: int):
        return dn.noise_plan_sample(clean, None, np.random.default_rng(i), ncfg, crop, float(d.frame_shuffle_prob))

    n = max(int(config.data.n_samples), 4)
    out["noise_only_samples_per_s_per_worker"], _ = _rate(noise_only, n, 1)
    out["plan_only_samples_per_s_per_worker"], _ = _rate(plan_only, n, 1)
    _consumer(config, out)
    return out


def _write_h5_cases(path: Path, n_cases: int, shape: tuple) -> None:
    """`n_cases` reference-layout cases (/<group>/<case>/{image, gmap}): complex noise around a constant signal in
    SNR units and two smooth g-maps each; only their sizes matter to the benchmark."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    with h5py.File(path, "w") as f:
        for i in range(n_cases):
            img = rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + 20.0
            g = f.create_group(f"site{i % 2}/case{i}")
            g["image"] = img.astype(np.complex64)
            g["gmap"] = np.stack([1 + x * (i + 1), 1 + y * (i + 1)], -1)[:, :, None, :].astype(np.float32)

