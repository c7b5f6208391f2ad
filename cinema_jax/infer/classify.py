"""`cinema-jax infer classify` (and `ef` with a regression checkpoint): study-level prediction from ED + ES.

ED / ES frames: a 2-frame input is (ED, ES); a longer cine needs --ed-frame / --es-frame (frame indices, 0-based),
since a classifier alone cannot tell which frame is end-systole. Both frames get the evaluation preprocessing of the
training config (one shared geometry). Outputs (atomic): summary.json (class probabilities or the regressed value in
its own units), overlay.png (ED | ES middle slice).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cinema_jax.infer import common

pick_frames = common.pick_frames  # kept here for callers of the old location


def run(ckpt, input, output, ed_frame: int | None = None, es_frame: int | None = None, overwrite: bool = False,
        tasks=("classify", "regress"), loaded: common.Loaded | None = None, series_uid: str | None = None) -> dict:
    import jax
    import scipy.special

    from cinema_jax import viz
    from cinema_jax.fileutil import atomic_dir, clean_json
    from cinema_jax.tasks.classify import preprocess_study

    timer = common.Timer()
    sources = (input, ckpt)
    common.check_output(output, overwrite, sources)
    loaded = loaded or common.load_model(ckpt, tasks)
    vol = common.read_input(input, series_uid)
    if loaded.view == "sax":
        cine, spacing = common.as_sax_cine(vol)
    else:
        lax, spacing = common.as_lax_cine(vol)
        cine = lax[:, :, None, :]
    common.check_content(cine, spacing, str(input))
    ed, es = pick_frames(cine, ed_frame, es_frame, str(input))
    stack = np.stack([cine[..., ed], cine[..., es]], -1)
    x = preprocess_study(stack, spacing, np.random.default_rng(0), loaded.config, train=False)
    out = np.asarray(jax.jit(lambda p, v: loaded.model.apply({"params": p}, v, train=False))(
        loaded.params, {loaded.view: x[None]}))[0]
    summary = {"input": str(input), "checkpoint": loaded.ckpt, "task": loaded.task.name, "view": loaded.view,
               "ed_frame": ed, "es_frame": es}
    if loaded.task.name == "classify":
        names = loaded.task.class_names(loaded.config)
        probs = scipy.special.softmax(out)
        summary["probabilities"] = {n: round(float(p), 4) for n, p in zip(names, probs)}
        summary["prediction"] = names[int(np.argmax(probs))]
    else:
        from cinema_jax.config import get

        mean, std = loaded.task.stats(loaded.config)
        summary["target"] = str(get(loaded.config, "data.target"))
        summary["prediction"] = float(out[0] * std + mean)
    with atomic_dir(output, overwrite=overwrite, sources=sources) as tmp:
        z = cine.shape[2] // 2
        viz.save_png(tmp / "overlay.png", viz.image_grid([[cine[:, :, z, ed], cine[:, :, z, es]]],
                                                         titles=[f"ED {ed} | ES {es}: {summary['prediction']}"]))
        summary["seconds"] = timer.seconds()
        summary["outputs"] = sorted(p.name for p in Path(tmp).iterdir()) + ["summary.json"]
        (tmp / "summary.json").write_text(json.dumps(clean_json(summary), indent=1))
    return summary
