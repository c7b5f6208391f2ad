"""Shared inference plumbing: checkpoint + model loading with a structure check, input reading and validation,
training-identical preprocessing of one frame, and the inverse mapping back to the input's own grid.

Why here: segment / landmark / classify inference all need "load a fine-tuned run, read a user's NIfTI or DICOM,
refuse bad input with one clear CinemaError before writing anything, preprocess exactly like evaluation".

Geometry: preprocessing = in-plane resample (spacing s -> t mm; output pixel i' sits at input coordinate
(i' + 0.5) t / s - 0.5) then crop/pad with top-left `start` (resampled pixels) then per-slice normalisation.
`to_input_coords` inverts that for probability maps and landmark coordinates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cinema_jax.data import augment as aug
from cinema_jax.errors import CheckpointError, CinemaError, DataError

MIN_FOV_MM = 60.0  # a field of view smaller than this cannot hold a heart
MIN_PIXELS = 16


@dataclass
class Loaded:
    """A fine-tuned model ready for inference."""

    task: Any
    model: Any
    params: Any
    config: Any
    view: str
    ckpt: str
    extras: dict = field(default_factory=dict)


def load_model(ckpt: str | Path, tasks: Sequence[str]) -> Loaded:
    """Load `ckpt` (a training workdir -> best else latest, or a checkpoint dir), check its task is one of `tasks`
    and that its params fit the model its config describes (CheckpointError otherwise: `train.restore.load_run`)."""
    from cinema_jax.config import get
    from cinema_jax.tasks.common import task_view
    from cinema_jax.train.restore import load_run

    run = load_run(ckpt, tasks)
    view = ""  # the denoiser has no single view (it reads several)
    if get(run.config, "data.view", None) is not None:
        try:
            view = task_view(run.config)
        except CinemaError as err:
            raise CheckpointError(f"{ckpt}: its config does not build a model ({err})") from None
    return Loaded(run.task, run.model, run.params, run.config, view, str(ckpt))


def check_output(output: str | Path, overwrite: bool = False, sources=()) -> None:
    """Refuse an unusable output before loading the model and running it (minutes on a CPU), not after: the rules
    of `fileutil.check_output_dir` (never inside or around an input or the checkpoint; `--overwrite` replaces only
    an output cinema-jax wrote)."""
    from cinema_jax.fileutil import check_output_dir

    check_output_dir(output, overwrite, sources)


def read_input(path: str | Path, series_uid: str | None = None) -> Any:
    """NIfTI file (.nii / .nii.gz) or DICOM directory / file -> io.Volume; DataError for anything unreadable.
    `series_uid` picks one series of a DICOM directory holding several."""
    from cinema_jax.data import io

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: input not found")
    name = p.name.lower()
    if p.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
        return io.read_nifti(p, ndim=(2, 3, 4))
    if p.is_dir() or name.endswith((".dcm", ".dicom", ".ima")) or "." not in name:
        return io.read_dicom_series(p, series_uid=series_uid)
    raise DataError(f"{p}: unsupported input (expected .nii / .nii.gz or a DICOM directory)")


def as_sax_cine(vol) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(x, y, z) or (x, y, z, t) SAX volume -> (x, y, z, t) float32 + (x, y, z) spacing mm."""
    arr = np.asarray(vol.array, np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise DataError(f"{vol.meta.get('path', 'input')}: short-axis input must be (x, y, z) or (x, y, z, t), "
                        f"got shape {arr.shape}")
    sp = tuple(float(s) for s in vol.spacing) + (10.0,) * (3 - len(vol.spacing))
    return arr, sp[:3]


def as_lax_cine(vol) -> tuple[np.ndarray, tuple[float, float]]:
    """(x, y), (x, y, t), (x, y, 1) or (x, y, 1, t) long-axis input -> (x, y, t) float32 + (x, y) spacing mm.

    A 3-D NIfTI is read as a cine (x, y, t) unless its last axis is 1."""
    arr = np.asarray(vol.array, np.float32)
    where = vol.meta.get("path", "input")
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 4:
        if arr.shape[2] != 1:
            raise DataError(f"{where}: long-axis input must be one plane, got {arr.shape[2]} slices {arr.shape}")
        arr = arr[:, :, 0]
    elif arr.ndim != 3:
        raise DataError(f"{where}: long-axis input must be (x, y) or (x, y, t), got shape {arr.shape}")
    return arr, (float(vol.spacing[0]), float(vol.spacing[1]))


def check_content(arr: np.ndarray, spacing: Sequence[float], where: str) -> None:
    """Refuse inputs that cannot hold a heart: tiny field of view, too few pixels, constant or non-finite frames."""
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: image holds NaN/Inf values")
    nx, ny = arr.shape[:2]
    fov = (nx * float(spacing[0]), ny * float(spacing[1]))
    if min(nx, ny) < MIN_PIXELS or min(fov) < MIN_FOV_MM:
        raise DataError(f"{where}: in-plane size {nx} x {ny} px ({fov[0]:.0f} x {fov[1]:.0f} mm) is too small to "
                        f"hold a heart (need >= {MIN_PIXELS} px and >= {MIN_FOV_MM:.0f} mm)")
    if any(s <= 0 or s > 20 for s in spacing[:2]):
        raise DataError(f"{where}: implausible in-plane spacing {tuple(spacing[:2])} mm")
    flat = arr.reshape(nx, ny, -1)
    stds = flat.std(axis=(0, 1))
    if not (stds > 1e-6 * max(1.0, float(np.abs(flat).max()))).any():
        raise DataError(f"{where}: image is constant (no content)")


def pick_frames(cine: np.ndarray, ed: int | None, es: int | None, where: str) -> tuple[int, int]:
    """ED / ES frame indices (0-based) of a (..., t) cine: the given ones (checked), or (0, 1) for a 2-frame input."""
    n_t = cine.shape[-1]
    if ed is None and es is None and n_t == 2:
        return 0, 1
    if ed is None or es is None:
        raise DataError(f"{where}: {n_t} frame(s); give --ed-frame and --es-frame (or a 2-frame ED, ES input)")
    for name, f in (("--ed-frame", ed), ("--es-frame", es)):
        if not 0 <= f < n_t:
            raise DataError(f"{where}: {name} {f} is outside the {n_t} frames")
    if ed == es:  # the same frame twice would give EF 0 / a meaningless ED-ES pair
        raise DataError(f"{where}: --ed-frame and --es-frame are both {ed}; ED and ES must be different frames")
    return int(ed), int(es)


@dataclass
class Prep:
    """One preprocessed frame and how to undo the geometry."""

    image: np.ndarray  # model grid (X', Y'[, Z'])
    in_shape: tuple[int, int]
    in_spacing: tuple[float, float]
    target: float | None
    start: tuple[int, int]
    resampled_shape: tuple[int, int]
    spacing: tuple[float, ...]  # model-grid spacing (mm)


def preprocess(image: np.ndarray, spacing: Sequence[float], config, view: str) -> Prep:
    """Evaluation preprocessing of one frame (x, y[, z]) exactly as the task's `transform(train=False)`."""
    from cinema_jax.tasks.common import augment_config

    cfg = augment_config(config, view, train=False)
    out = aug.chen_pipeline(image, None, spacing, np.random.default_rng(0), cfg, False)
    target = cfg["target_spacing"] or None
    res_shape = aug.resample_inplane(np.zeros(image.shape[:2], np.float32), spacing, target, 0).shape
    return Prep(out["image"], tuple(image.shape[:2]), (float(spacing[0]), float(spacing[1])), target,
                tuple(out["crop_start"]), tuple(res_shape), tuple(out["spacing"]))


def to_input_coords(prep: Prep) -> tuple[np.ndarray, np.ndarray]:
    """Model-grid coordinates (gx, gy) of every input pixel (input-shaped), for sampling maps back."""
    ix = np.arange(prep.in_shape[0], dtype=np.float64)
    iy = np.arange(prep.in_shape[1], dtype=np.float64)
    if prep.target:
        ix = (ix + 0.5) * prep.in_spacing[0] / prep.target - 0.5
        iy = (iy + 0.5) * prep.in_spacing[1] / prep.target - 0.5
    gx, gy = np.meshgrid(ix - prep.start[0], iy - prep.start[1], indexing="ij")
    return gx, gy


def points_to_input(prep: Prep, points: np.ndarray) -> np.ndarray:
    """(K, 2) model-grid pixel (x, y) -> input pixel (x, y)."""
    p = np.asarray(points, np.float64) + np.asarray(prep.start, np.float64)
    if prep.target:
        p = (p + 0.5) * prep.target / np.asarray(prep.in_spacing) - 0.5
    return p


def probs_to_input(prep: Prep, probs: np.ndarray) -> np.ndarray:
    """(X', Y'[, Z'], C) class probabilities on the model grid -> (x, y[, Z'], C) on the input grid (linear;
    outside the crop everything is background), as Chen's predict.py does before the argmax."""
    gx, gy = to_input_coords(prep)
    coords = np.stack([gx, gy])
    lead = probs.shape[2:-1]
    flat = probs.reshape(probs.shape[:2] + (-1,))
    out = np.empty(prep.in_shape + (flat.shape[-1],), np.float32)
    for k in range(flat.shape[-1]):
        cval = 1.0 if k % probs.shape[-1] == 0 else 0.0
        out[..., k] = ndimage.map_coordinates(flat[..., k], coords, order=1, mode="constant", cval=cval)
    return out.reshape(prep.in_shape + lead + (probs.shape[-1],))


def display_slices(n: int, k: int = 3) -> list[int]:
    """Up to k evenly spread slice indices, skipping the outermost ones when possible."""
    if n <= k:
        return list(range(n))
    return [int(round(v)) for v in np.linspace(n * 0.25, n * 0.75 - 1, k)]


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def seconds(self) -> float:
        return round(time.time() - self.t0, 2)
