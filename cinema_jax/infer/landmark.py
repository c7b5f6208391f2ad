"""`cinema-jax infer landmark`: mitral hinges + apex on every frame of a LAX cine, with GLS-style strain and MAPSE.

Per frame: evaluation preprocessing of the training config, heatmap soft-argmax or coordinate read-out, coordinates
mapped back to input pixels. Long-axis length L_t (apex to mid-valve, mm), GLS = % change between max and min L, MAPSE
= mean hinge excursion toward the apex (cinema_jax.metrics.landmark). Outputs (atomic): landmarks.csv (frame, x/y
pixels and mm per landmark), overlay.png, cine.gif, length.png, summary.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cinema_jax.infer import common


def run(ckpt, input, output, overwrite: bool = False, loaded: common.Loaded | None = None,
        series_uid: str | None = None) -> dict:
    from cinema_jax import viz
    from cinema_jax.fileutil import atomic_dir, clean_json
    from cinema_jax.metrics import landmark as lm

    timer = common.Timer()
    sources = (input, ckpt)
    common.check_output(output, overwrite, sources)
    loaded = loaded or common.load_model(ckpt, ("landmark",))
    vol = common.read_input(input, series_uid)
    cine, spacing = common.as_lax_cine(vol)
    common.check_content(cine, spacing, str(input))
    fn = loaded.task.predict_fn(loaded.model)
    pts = []
    for t in range(cine.shape[-1]):
        prep = common.preprocess(cine[:, :, t], spacing, loaded.config, loaded.view)
        p = np.asarray(fn(loaded.params, {loaded.view: prep.image[None, ..., None]}))[0]
        pts.append(common.points_to_input(prep, p))
    pts = np.stack(pts)  # (T, 3, 2) input pixels
    n_t = len(pts)
    summary = {"input": str(input), "checkpoint": loaded.ckpt, "view": loaded.view, "n_frames": n_t,
               "spacing_mm": list(spacing), "landmarks": list(lm.LANDMARK_NAMES),
               "coordinates": "input pixel (x, y) = array indices along the first two axes"}
    length = lm.long_axis_length_mm(pts, spacing)
    summary["long_axis_length_mm"] = [round(float(v), 2) for v in length]
    if n_t > 1:
        summary["gls_percent"] = lm.gls_percent(pts, spacing)
        summary["mapse_mm"] = lm.mapse_mm(pts, spacing)
        summary["ed_frame"], summary["es_frame"] = int(np.argmax(length)), int(np.argmin(length))
    with atomic_dir(output, overwrite=overwrite, sources=sources) as tmp:
        head = ["frame"] + [f"{n}_{a}" for n in lm.LANDMARK_NAMES for a in ("x_px", "y_px", "x_mm", "y_mm")]
        lines = [",".join(head)]
        for t in range(n_t):
            vals = []
            for k in range(3):
                x, y = pts[t, k]
                vals += [f"{x:.2f}", f"{y:.2f}", f"{x * spacing[0]:.2f}", f"{y * spacing[1]:.2f}"]
            lines.append(",".join([str(t)] + vals))
        (tmp / "landmarks.csv").write_text("\n".join(lines) + "\n")
        ed = int(summary.get("ed_frame", 0))
        es = int(summary.get("es_frame", 0))
        panels = [viz.draw_landmarks(cine[:, :, ed], pts[ed]), viz.draw_landmarks(cine[:, :, es], pts[es])]
        viz.save_png(tmp / "overlay.png", viz.image_grid([panels], titles=[f"ED frame {ed} | ES frame {es}"]))
        viz.save_gif(tmp / "cine.gif", [viz.draw_landmarks(cine[:, :, t], pts[t]) for t in range(n_t)], fps=8)
        if n_t > 1:
            viz.volume_curve_png(tmp / "length.png", {"long-axis length (mm)": length},
                                 title=f"GLS {summary['gls_percent']:.1f} %, MAPSE {summary['mapse_mm']:.1f} mm")
        summary["seconds"] = timer.seconds()
        summary["outputs"] = sorted(p.name for p in Path(tmp).iterdir()) + ["summary.json"]
        (tmp / "summary.json").write_text(json.dumps(clean_json(summary), indent=1))
    return summary
