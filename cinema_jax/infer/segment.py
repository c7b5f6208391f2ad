"""`cinema-jax infer segment|ef`: segment every frame of a SAX (or LAX) cine, map the masks back to the input grid,
and derive volume curves, ED/ES and LV/RV EF.

Per frame (3D+t inputs are run frame by frame, reference issue #26): evaluation preprocessing of the training config
(Chen: in-plane resample, centre crop/pad, per-slice normalisation), z fitted to the model's slice count (50 %
overlapping windows averaged when the stack is deeper), softmax probabilities mapped back to the input grid (linear)
and the argmax taken there (Chen's predict.py). ED / ES = frames of max / min LV volume (reference Kaggle/Rescan
evaluation; issue #28 users have no ED/ES indices). Volumes count label voxels x voxel volume (not issue #30's sum).

Outputs (written atomically into --output): mask.nii.gz (uint8, input geometry and dimensionality), overlay.png,
cine.gif, volumes.png + volumes.csv (SAX; LAX: areas in cm^2), summary.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cinema_jax.errors import DataError
from cinema_jax.infer import common


def z_windows(nz: int, depth: int) -> list[int]:
    """Start slices of depth-long windows covering nz slices with >= 50 % overlap ([0] when nz <= depth)."""
    if nz <= depth:
        return [0]
    step = max(1, depth // 2)
    starts = list(range(0, nz - depth + 1, step))
    if starts[-1] != nz - depth:
        starts.append(nz - depth)
    return starts


def predict_frame(loaded: common.Loaded, fn, frame: np.ndarray, spacing) -> np.ndarray:
    """One frame (x, y[, z]) -> uint8 labels on the input grid."""
    from cinema_jax.tasks.common import model_image_size

    size = model_image_size(loaded.config, loaded.view)
    prep = common.preprocess(frame, spacing, loaded.config, loaded.view)
    img = prep.image
    if loaded.view != "sax":
        probs = np.asarray(fn(loaded.params, {loaded.view: img[None, ..., None]})[loaded.view][1][0])
    else:
        depth, nz = size[2], img.shape[2]
        acc = np.zeros(img.shape + (int(loaded.model.out_chans),), np.float32)
        cnt = np.zeros(nz, np.float32)
        starts = z_windows(nz, depth)
        windows = []
        for s in starts:
            w = img[:, :, s:s + depth]
            if w.shape[2] < depth:
                w = np.pad(w, [(0, 0), (0, 0), (0, depth - w.shape[2])])
            windows.append(w)
        out = np.asarray(fn(loaded.params, {"sax": np.stack(windows)[..., None]})["sax"][1])
        for s, p in zip(starts, out):
            n = min(depth, nz - s)
            acc[:, :, s:s + n] += p[:, :, :n]
            cnt[s:s + n] += 1
        probs = acc / cnt[None, None, :, None]
    return np.argmax(common.probs_to_input(prep, probs), axis=-1).astype(np.uint8)


def run(ckpt, input, output, overwrite: bool = False, loaded: common.Loaded | None = None,
        ed_frame: int | None = None, es_frame: int | None = None, need_cine: bool = False,
        series_uid: str | None = None) -> dict:
    """Segment `input` with the segmentation run `ckpt`; write everything into the directory `output`.

    `ed_frame` / `es_frame` (0-based, both or neither) replace the max / min LV volume frames for EDV/ESV/EF;
    `need_cine` (the `ef` command) refuses a one-frame input, which has no EF."""
    from cinema_jax import viz
    from cinema_jax.data import io
    from cinema_jax.fileutil import atomic_dir, clean_json
    from cinema_jax.metrics import clinical

    timer = common.Timer()
    sources = (input, ckpt)
    common.check_output(output, overwrite, sources)
    loaded = loaded or common.load_model(ckpt, ("segment",))
    vol = common.read_input(input, series_uid)
    where = str(input)
    if loaded.view == "sax":
        cine, spacing = common.as_sax_cine(vol)
    else:
        cine, spacing = common.as_lax_cine(vol)
        cine = cine[:, :, None, :]  # (x, y, 1, t): one plane
    common.check_content(cine, spacing, where)
    n_t = cine.shape[-1]
    if need_cine and n_t < 2:
        raise DataError(f"{where}: EF needs a cine with >= 2 frames, got one frame (use `infer segment` for a "
                        "single frame)")
    given = None
    if ed_frame is not None or es_frame is not None:
        given = common.pick_frames(cine, ed_frame, es_frame, where)
    fn = loaded.task.predict_fn(loaded.model)
    masks = np.stack([predict_frame(loaded, fn, cine[:, :, :, t] if loaded.view == "sax" else cine[:, :, 0, t],
                                    spacing) for t in range(n_t)], -1)
    if masks.ndim == 3:  # LAX frames (x, y, t) -> (x, y, 1, t)
        masks = masks[:, :, None, :]
    if not (masks == 3).any():
        raise _no_heart(where)
    summary: dict = {"input": str(input), "checkpoint": str(loaded.ckpt), "view": loaded.view,
                     "input_shape": list(vol.array.shape), "spacing_mm": list(spacing), "n_frames": n_t,
                     "labels": {"1": "RV", "2": "MYO", "3": "LV"}}
    curves = {}
    if loaded.view == "sax":
        curves = clinical.volume_curves(np.moveaxis(masks, -1, 0), spacing)
        summary["volume_units"] = "mL (label-voxel count x voxel volume)"
    else:
        px_cm2 = spacing[0] * spacing[1] / 100.0
        curves = {k: np.array([np.count_nonzero(masks[..., t] == v) * px_cm2 for t in range(n_t)])
                  for k, v in (("rv", 1), ("myo", 2), ("lv", 3))}
        summary["volume_units"] = "cm^2 (areas in the long-axis plane)"
    summary.update(clinical.cycle_measures(curves) if n_t > 1 else {})
    if given is not None:
        summary.update(_measures_at(curves, *given))
    if n_t == 1:
        summary.update({f"{k}_volume": float(v[0]) for k, v in curves.items()})
    summary["curves"] = {k: [round(float(x), 3) for x in v] for k, v in curves.items()}
    ed = int(summary.get("ed_frame", 0))
    es = int(summary.get("es_frame", 0))
    with atomic_dir(output, overwrite=overwrite, sources=sources) as tmp:
        nd = vol.array.ndim
        if loaded.view == "sax":
            out_mask = masks if nd == 4 else masks[..., 0]
        else:
            out_mask = {2: masks[:, :, 0, 0], 3: masks[:, :, 0, :], 4: masks}[nd]
        io.write_nifti(tmp / "mask.nii.gz", out_mask.astype(np.uint8), affine=vol.affine)
        zs = common.display_slices(cine.shape[2])
        rows, titles = [], []
        for name, t in (("ED", ed), ("ES", es)) if n_t > 1 else (("frame 0", 0),):
            rows.append([viz.overlay_labels(cine[:, :, z, t], masks[:, :, z, t]) for z in zs])
            titles.append(f"{name} (frame {t}), slices {zs}")
        viz.save_png(tmp / "overlay.png", viz.image_grid(rows, titles=titles))
        gif_zs = common.display_slices(cine.shape[2], 3)
        viz.save_gif(tmp / "cine.gif", [viz.image_grid([[viz.overlay_labels(cine[:, :, z, t], masks[:, :, z, t])
                                                         for z in gif_zs]]) for t in range(n_t)], fps=8)
        if n_t > 1:
            title = f"LVEF {summary['lv_ef']:.1f} %" + (f", RVEF {summary['rv_ef']:.1f} %" if "rv_ef" in summary
                                                        else "")
            viz.volume_curve_png(tmp / "volumes.png", {k.upper(): v for k, v in curves.items() if k != "myo"},
                                 title=title)
        lines = ["frame," + ",".join(curves)] + [f"{t}," + ",".join(f"{curves[k][t]:.4f}" for k in curves)
                                                 for t in range(n_t)]
        (tmp / "volumes.csv").write_text("\n".join(lines) + "\n")
        summary["seconds"] = timer.seconds()
        summary["outputs"] = sorted(p.name for p in Path(tmp).iterdir()) + ["summary.json"]
        (tmp / "summary.json").write_text(json.dumps(clean_json(summary), indent=1))
    return summary


def _measures_at(curves: dict, ed: int, es: int) -> dict:
    """EDV / ESV / EF at the user's ED and ES frames (LV and RV at the same frames)."""
    from cinema_jax.metrics.clinical import ejection_fraction

    out = {"ed_frame": ed, "es_frame": es, "ed_es_frames": "given (--ed-frame / --es-frame)"}
    for k in ("lv", "rv"):
        if k in curves:
            edv, esv = float(curves[k][ed]), float(curves[k][es])
            out.update({f"{k}_edv": edv, f"{k}_esv": esv, f"{k}_ef": ejection_fraction(edv, esv)})
    if "lv" in curves and out["lv_esv"] > out["lv_edv"]:  # kept as asked, but said: a negative EF is never real
        out["warning"] = (f"LV volume at ES (frame {es}) exceeds ED (frame {ed}): the frames look swapped; the "
                          f"volume curve peaks at frame {int(np.argmax(curves['lv']))}")
        print(f"warning: {out['warning']}", file=sys.stderr)
    return out


def _no_heart(where: str):
    return DataError(f"{where}: no left ventricle found in any frame (is this a cardiac short-axis / 4-chamber "
                     "image at a plausible field of view?)")
