"""Denoise a user's cine series with a trained SNRAware model.

Inputs: a DICOM series (directory or .dcm files), NIfTI magnitude (.nii/.nii.gz, (x, y[, z], t)), or complex arrays
(.npy; .h5 with a dataset 'image' or a single dataset), layout (x, y[, z], t). Optional g-map (same formats,
(x, y[, z]) or with t) in the same matrix.

Assumptions when there is no calibration (documented in the summary JSON): g = 1 everywhere unless a g-map is given,
and the noise std is estimated from the image background (`cinema_jax.data.noise.estimate_noise_sigma`, Rayleigh
statistics in air; magnitude data treated as Rician). The series is divided by that sigma to put it in SNR units,
denoised slice by slice (all frames at once), and scaled back to the input's intensity units.

Outputs (written atomically into `output`, which must not already hold files): the denoised series in the input's
format and geometry (DICOM input -> `denoised.nii.gz` with the DICOM geometry, since we do not write DICOM;
NIfTI -> `denoised.nii.gz` with the input affine; .npy / .h5 -> same format, complex when the input was complex),
`before_after.png` (middle slice, first frame), `frames.gif` (noisy | denoised over frames) and `summary.json`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np

from cinema_jax.errors import CinemaError, ConfigError, DataError

NOISE_FLOOR = 1e-6  # `estimate_noise_sigma` never returns less: a sigma at the floor measured nothing


def _load_array_file(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                names = []
                f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
                name = "image" if "image" in f else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise DataError(f"{path}: expected a dataset 'image' or a single dataset, found {names}")
                return np.asarray(f[name])
    except CinemaError:
        raise
    except Exception as e:  # unreadable / truncated file
        raise DataError(f"cannot read {path}: {e}") from e
    raise DataError(f"{path}: unsupported file type (use DICOM, .nii/.nii.gz, .npy or .h5)")


def read_input(path, series_uid: str | None = None) -> dict:
    """-> dict(array (x, y, z, t) complex64 or float32, affine, spacing, format, complex)."""
    from cinema_jax.data import io

    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        vol = io.read_dicom_series(path, series_uid=series_uid)
        arr, fmt, affine, spacing = vol.array, "dicom", vol.affine, vol.spacing
    elif name.endswith(".nii") or name.endswith(".nii.gz"):
        vol = io.read_nifti(path, ndim=(3, 4), allow_complex=True)  # complex NIfTI: denoised as complex
        arr, fmt, affine, spacing = vol.array, "nifti", vol.affine, vol.spacing
    else:
        arr = _load_array_file(path)
        fmt, affine, spacing = ("npy" if path.suffix == ".npy" else "h5"), None, None
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, :, None, :]
    if arr.ndim != 4:
        raise DataError(f"{path}: expected (x, y, t) or (x, y, z, t), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number)) or not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: array must be numeric and finite")
    if min(arr.shape[:2]) < 8:
        raise DataError(f"{path}: image {arr.shape[:2]} is too small (need >= 8 x 8 pixels)")
    cplx = np.iscomplexobj(arr)
    return dict(array=arr.astype(np.complex64 if cplx else np.float32), affine=affine, spacing=spacing, format=fmt,
                complex=cplx)


def _read_gmap(path, shape) -> np.ndarray:
    from cinema_jax.data import io

    path = Path(path)
    if not path.exists():
        raise DataError(f"g-map {path} does not exist")
    name = path.name.lower()
    nifti = name.endswith(".nii") or name.endswith(".nii.gz")
    g = io.read_nifti(path, allow_complex=True).array if nifti else _load_array_file(path)
    g = np.abs(np.asarray(g, np.float64 if not np.iscomplexobj(g) else np.complex128)).astype(np.float32)
    x, y, z, t = shape
    if g.shape[:2] != (x, y):
        raise DataError(f"g-map {path}: shape {g.shape} does not match the image (x, y) = {(x, y)}")
    if g.ndim == 2:
        g = g[:, :, None, None]
    elif g.ndim == 3:
        g = g[:, :, :, None] if g.shape[2] == z else g[:, :, None, :]
    try:
        g = np.broadcast_to(g, shape).astype(np.float32)
    except ValueError as e:
        raise DataError(f"g-map {path}: shape {g.shape} cannot broadcast to {shape}") from e
    if not np.all(np.isfinite(g)) or g.min() <= 0:
        raise DataError(f"g-map {path}: values must be finite and > 0")
    return np.maximum(g, 1.0)


def _load_model(ckpt):
    """-> (model, params, config) from a training workdir or checkpoint dir, checked like every infer command: a
    denoise run whose params fit the model its config builds (CheckpointError for a seg / MAE run, a missing
    config.json or an edited config)."""
    from cinema_jax.infer.common import load_model

    loaded = load_model(ckpt, ("denoise",))
    return loaded.model, loaded.params, loaded.config


@functools.lru_cache(maxsize=4)
def _forward(model):
    """One jitted forward per model (Linen modules are hashable), so every slice of a series reuses the compile."""
    import jax

    return jax.jit(lambda p, v: model.apply({"params": p}, v, train=False))


def _pad_to(series: np.ndarray, gmap: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    pad = tuple((0, max(n - m, 0)) for m, n in zip(series.shape, shape))
    small = any(p[1] >= m for p, m in zip(pad, series.shape))  # reflect needs the pad shorter than the axis
    return np.pad(series, pad, mode="edge" if small else "reflect"), np.pad(gmap, pad, mode="edge")


def blend_weights(tile, overlap) -> np.ndarray:
    """Per-voxel tile weight: 1 inside, linear ramps over the overlap (never 0), so seams fade across tiles."""
    w = np.ones(tuple(tile), np.float32)
    for ax, (n, o) in enumerate(zip(tile, overlap)):
        r = np.ones(n, np.float32)
        if o > 0:
            ramp = (np.arange(o, dtype=np.float32) + 1) / (o + 1)
            r[:o] = ramp
            r[n - o:] = np.minimum(r[n - o:], ramp[::-1])
        w = w * r.reshape([-1 if i == ax else 1 for i in range(len(tile))])
    return w


def denoise_array(model, params, config, series: np.ndarray, gmap: np.ndarray, tile=None,
                  overlap=(16, 16, 8), tile_batch: int = 4) -> np.ndarray:
    """Denoise one (x, y, t) complex series in SNR units -> complex (x, y, t).

    tile=None: the whole series in one forward (the model cuts x, y into its build-size tiles itself; temporal
    attention sees every frame). tile=(tx, ty, tt): the reference's inference, bounded memory for long or large
    series: overlapping tiles (`overlap` voxels per axis) run in batches of `tile_batch` through one compiled
    forward and are blended with `blend_weights` (a series smaller than a tile is padded)."""
    from cinema_jax.models.imaging_transformer import tile_starts
    from cinema_jax.tasks.denoise import to_model_units

    x, y, t = series.shape
    forward = _forward(model)
    if tile is None:  # the model pads / tiles x, y to its own build size itself
        image, scale = to_model_units(series, gmap, config)
        out = np.asarray(forward(params, image[None]))[0] * scale
        return (out[..., 0] + 1j * out[..., 1]).astype(np.complex64)
    tile, overlap = tuple(int(v) for v in tile), tuple(int(v) for v in overlap)
    if len(tile) != 3 or len(overlap) != 3 or min(tile) < 1:
        raise ConfigError(f"denoise tiling: tile and overlap are (x, y, t) triples, got {tile} and {overlap}")
    if any(o < 0 or o >= k for o, k in zip(overlap, tile)):
        raise ConfigError(f"denoise tiling: overlap {overlap} must be in [0, tile {tile}) per axis")
    s, g = _pad_to(series, gmap, tuple(max(n, k) for n, k in zip((x, y, t), tile)))
    image, scale = to_model_units(s, g, config)
    origins = [(i, j, k) for i in tile_starts(s.shape[0], tile[0], overlap[0])
               for j in tile_starts(s.shape[1], tile[1], overlap[1])
               for k in tile_starts(s.shape[2], tile[2], overlap[2])]
    w = blend_weights(tile, overlap)[..., None]
    acc = np.zeros(s.shape + (2,), np.float32)
    norm = np.zeros(s.shape + (1,), np.float32)
    for b0 in range(0, len(origins), tile_batch):
        group = origins[b0:b0 + tile_batch]
        batch = np.zeros((tile_batch,) + tile + (image.shape[-1],), np.float32)  # fixed shape: one compile
        for n, (i, j, k) in enumerate(group):
            batch[n] = image[i:i + tile[0], j:j + tile[1], k:k + tile[2]]
        pred = np.asarray(forward(params, batch))
        for n, (i, j, k) in enumerate(group):
            acc[i:i + tile[0], j:j + tile[1], k:k + tile[2]] += w * pred[n]
            norm[i:i + tile[0], j:j + tile[1], k:k + tile[2]] += w
    out = acc / norm * scale
    return (out[..., 0] + 1j * out[..., 1])[:x, :y, :t].astype(np.complex64)


def _panel(mag: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((mag - lo) / max(hi - lo, 1e-12), 0, 1)


def run(ckpt, input, output, gmap=None, model_bundle=None, overwrite: bool = False, tile=None,
        overlap=(16, 16, 8), series_uid: str | None = None) -> dict:
    """Denoise `input` with the model in `ckpt`, write results into the directory `output`; returns the summary.

    `model_bundle` = (model, params, config) skips checkpoint loading (tests, notebooks).
    """
    from cinema_jax import viz
    from cinema_jax.data import io
    from cinema_jax.data.noise import estimate_noise_sigma
    from cinema_jax.fileutil import atomic_dir, clean_json
    from cinema_jax.infer.common import check_output

    t0 = time.time()
    sources = (input, ckpt, gmap)
    check_output(output, overwrite, sources)
    data = read_input(input, series_uid)
    arr = data["array"]
    g = _read_gmap(gmap, arr.shape) if gmap is not None else np.ones(arr.shape, np.float32)
    mag = np.abs(arr)
    if not float(mag.max()) > float(mag.min()):
        raise DataError(f"{input}: image is constant (no content to denoise)")
    sigma = float(estimate_noise_sigma(mag))
    if not math.isfinite(sigma) or sigma <= NOISE_FLOOR:  # the estimator's floor: no measurable noise, and dividing
        # by it would blow the series up to ~1e6 SNR units (garbage output)
        raise DataError(f"{input}: could not estimate the noise level from the background (no measurable noise: "
                        "a zero-filled, synthetic or already denoised image?)")
    model, params, config = model_bundle if model_bundle is not None else _load_model(ckpt)
    out = np.empty(arr.shape, np.complex64)
    for z in range(arr.shape[2]):
        out[:, :, z] = denoise_array(model, params, config, arr[:, :, z].astype(np.complex64) / sigma, g[:, :, z],
                                     tile=tile, overlap=overlap)
    out *= sigma
    result = out if data["complex"] else np.abs(out).astype(np.float32)
    zmid = arr.shape[2] // 2
    before, after = mag[:, :, zmid], np.abs(out[:, :, zmid])
    hi = float(np.percentile(before, 99.5))
    bright = before[before > np.percentile(before, 75)]
    summary = dict(input=str(input), format=data["format"], shape=list(arr.shape), complex_input=data["complex"],
                   noise_sigma=sigma, noise_sigma_units="input intensity units (std per real/imag channel)",
                   gmap="given" if gmap is not None else "assumed 1 everywhere",
                   noise_estimate="background Rayleigh fit (cinema_jax.data.noise.estimate_noise_sigma)",
                   median_snr_input=float(np.median(bright)) / sigma if bright.size else None,
                   tiling=f"tiles {list(tile)} overlap {list(overlap)}" if tile else "whole series",
                   checkpoint=str(ckpt), seconds=0.0)
    with atomic_dir(output, overwrite=overwrite, sources=sources) as tmp:
        if data["format"] in ("dicom", "nifti"):
            aff = data["affine"]
            vol = result[:, :, 0] if (data["format"] == "nifti" and arr.shape[2] == 1) else result
            io.write_nifti(tmp / "denoised.nii.gz", vol if data["complex"] else np.asarray(vol, np.float32),
                           affine=aff)
            summary["output"] = "denoised.nii.gz" + (" (NIfTI with the DICOM geometry)" if data["format"] == "dicom"
                                                     else "")
        elif data["format"] == "npy":
            np.save(tmp / "denoised.npy", result[:, :, 0] if arr.shape[2] == 1 else result)
            summary["output"] = "denoised.npy"
        else:
            import h5py

            with h5py.File(tmp / "denoised.h5", "w") as f:
                f.create_dataset("image", data=result[:, :, 0] if arr.shape[2] == 1 else result)
            summary["output"] = "denoised.h5"
        viz.save_png(tmp / "before_after.png",
                     viz.image_grid([[_panel(before[..., 0], 0, hi), _panel(after[..., 0], 0, hi)]],
                                    titles=[f"input | denoised (sigma {sigma:.3g})"]))
        frames = [viz.image_grid([[_panel(before[..., k], 0, hi), _panel(after[..., k], 0, hi)]])
                  for k in range(arr.shape[3])]
        viz.save_gif(tmp / "frames.gif", frames)
        summary["seconds"] = round(time.time() - t0, 2)
        (tmp / "summary.json").write_text(json.dumps(clean_json(summary), indent=2))
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--ckpt", required=True, help="training workdir or checkpoint directory")
    parser.add_argument("--input", required=True, help="DICOM dir/file, .nii/.nii.gz, .npy or .h5 (x, y[, z], t)")
    parser.add_argument("--output", required=True, help="output directory (created; must not hold files)")
    parser.add_argument("--gmap", default=None, help="optional g-factor map (x, y[, z][, t]); default g = 1")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory an earlier cinema-jax run wrote (never anything else)")
    parser.add_argument("--series-uid", default=None, help="DICOM input: the SeriesInstanceUID to read when the "
                        "directory holds several series")
    parser.add_argument("--tile", default=None, help="X,Y,T: denoise in overlapping tiles of this size (bounded "
                        "memory; the reference uses its training cutout, e.g. 64,64,16); default: whole series")
    parser.add_argument("--overlap", default="16,16,8", help="X,Y,T tile overlap, blended linearly (default 16,16,8)")


def _triple(text, name):
    try:
        v = tuple(int(a) for a in str(text).split(","))
    except ValueError:
        v = ()
    if len(v) != 3:
        raise ConfigError(f"--{name} must be three comma-separated integers X,Y,T, got {text!r}")
    return v


def run_from_args(args) -> dict:
    tile = getattr(args, "tile", None)
    return run(args.ckpt, args.input, args.output, gmap=args.gmap, overwrite=bool(getattr(args, "overwrite", False)),
               tile=_triple(tile, "tile") if tile else None,
               overlap=_triple(getattr(args, "overlap", "16,16,8"), "overlap"),
               series_uid=getattr(args, "series_uid", None))
