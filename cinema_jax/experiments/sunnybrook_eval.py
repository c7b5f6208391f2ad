"""Real-data check on Sunnybrook: LV / MYO Dice and LV EF for (a) a segmenter fine-tuned on the synthetic phantom
only and (b) one fine-tuned on part of Sunnybrook, both evaluated on held-out Sunnybrook subjects.

Evaluation uses the inference path (`cinema_jax.infer.segment.predict_frame`: Chen preprocessing, z windows,
probabilities mapped back to the native DICOM grid, argmax there), then scores on the expert-contoured slices only:
LV Dice at ED and ES, MYO Dice at ED (Sunnybrook has epicardial contours at ED only), and LV EF from label-voxel
counts over the slices contoured at both phases, against the same count on the expert masks. RV is not contoured in
Sunnybrook and is not scored. Each frame is first percentile-clipped to [0, 1] exactly as `SunnybrookSource` does for
training (`layout.normalise_intensity`), so the Sunnybrook fine-tune sees the same intensities at test time; the
per-slice z-score of the Chen pipeline follows. Volumes (mL) use the loader's z spacing (DICOM
ImagePositionPatient step, 10 / 10 / 8 mm); EF is a ratio and does not depend on it.

    python -m cinema_jax.experiments.sunnybrook_eval --workdir runs/sunnybrook --root ../shared/data/sunnybrook \
        --synthetic-ckpt runs/domain_shift/chen --init-from runs/demo/mae --train-subjects SCD0000101 SCD0000201
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from cinema_jax.fileutil import clean_json, write_json_atomic, write_text_atomic


def finetune_config(root: str, train: list[str], val: list[str], steps: int, init_from: str, size: int,
                    spacing: float, seed: int):
    from cinema_jax.config import load_config

    c = load_config("configs/finetune_seg.py:smoke")
    with c.unlocked():
        c.data.source = "sunnybrook"
        c.data.root = str(root)
        c.data.mode = "volume"
        c.data.preprocess = False
        c.data.subjects = {"train": list(train), "val": list(val), "test": list(val)}
    c.total_steps = steps
    c.batch_size = 4  # the batch the README table was measured with (the smoke config now uses 8)
    c.eval_every = steps
    c.checkpoint_every = steps
    c.image_every = steps
    c.log_every = max(1, steps // 10)
    c.seed = seed
    c.init_from = init_from
    c.eval_hd95 = False
    c.model.sax_size = (size, size, 8)
    c.data.augment.target_spacing = spacing
    c.data.augment.rotate_deg = 180.0
    return c


def evaluate_subjects(ckpt, root, subjects: list[str]) -> list[dict]:
    from cinema_jax.data.layout import normalise_intensity
    from cinema_jax.data.sunnybrook import load_sunnybrook
    from cinema_jax.infer import common
    from cinema_jax.infer.segment import predict_frame
    from cinema_jax.metrics.clinical import ejection_fraction, volume_ml
    from cinema_jax.metrics.segmentation import dice

    loaded = common.load_model(ckpt, ("segment",))
    fn = loaded.task.predict_fn(loaded.model)
    rows = []
    for sub in load_sunnybrook(root, subjects):
        zs = list(sub.annotated_slices)
        pred = {ph: predict_frame(loaded, fn, normalise_intensity(sub.frame(ph)), sub.spacing) for ph in ("ed", "es")}
        true = {"ed": sub.ed_label, "es": sub.es_label}
        myo_z = [z for z in zs if (true["ed"][:, :, z] == 2).any()]
        row = {"pid": sub.pid,
               "dice_LV_ed": dice(pred["ed"][:, :, zs] == 3, true["ed"][:, :, zs] == 3),
               "dice_LV_es": dice(pred["es"][:, :, zs] == 3, true["es"][:, :, zs] == 3),
               "dice_MYO_ed": dice(pred["ed"][:, :, myo_z] == 2, true["ed"][:, :, myo_z] == 2) if myo_z
               else float("nan")}
        edv = volume_ml(pred["ed"][:, :, zs], 3, sub.spacing)
        esv = volume_ml(pred["es"][:, :, zs], 3, sub.spacing)
        ref = sub.lv_volumes()
        row.update(pred_lv_edv=edv, pred_lv_esv=esv, pred_lv_ef=ejection_fraction(edv, esv),
                   true_lv_edv=ref["lv_edv"], true_lv_esv=ref["lv_esv"], true_lv_ef=ref["lv_ef"])
        row["lv_ef_abs_err"] = abs(row["pred_lv_ef"] - row["true_lv_ef"])
        row.update(lv_ed_labelled_as(pred["ed"][:, :, zs], true["ed"][:, :, zs]))
        rows.append(row)
        short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(clean_json(short)), flush=True)
    return rows


def lv_ed_labelled_as(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Where the expert LV blood-pool voxels went: the fraction predicted as each class (what a low LV Dice means)."""
    lv = pred[true == 3]
    return {f"lv_ed_as_{name}": float((lv == c).mean()) if lv.size else float("nan")
            for c, name in enumerate(("bg", "rv", "myo", "lv"))}


def run(workdir: str, root: str, synthetic_ckpt: str | list[str], init_from: str, train_subjects: list[str],
        steps: int = 2000, size: int = 32, spacing: float = 6.0, seed: int = 0) -> dict:
    from cinema_jax.data.sunnybrook import load_sunnybrook
    from cinema_jax.train.loop import train

    all_ids = [s.pid for s in load_sunnybrook(root)]
    test = [p for p in all_ids if p not in train_subjects]
    if not test:
        raise SystemExit("no held-out Sunnybrook subject: leave at least one out of --train-subjects")
    wd = Path(workdir)
    cfg = finetune_config(root, train_subjects, test, steps, init_from, size, spacing, seed)
    train(cfg, wd / "sunnybrook_ft")
    out = {"train_subjects": train_subjects, "test_subjects": test, "steps": steps, "models": {}}
    synth = [synthetic_ckpt] if isinstance(synthetic_ckpt, str) else list(synthetic_ckpt)
    models = [(f"synthetic_only:{Path(c).name}", c) for c in synth] + [("sunnybrook_ft", wd / "sunnybrook_ft")]
    for name, ckpt in models:
        rows = evaluate_subjects(ckpt, root, test)
        out["models"][name] = {"rows": rows, **summarise(rows)}
    table = markdown_table(out)
    print("\n".join(table))
    write_json_atomic(wd / "sunnybrook_eval.json", out)
    write_text_atomic(wd / "sunnybrook_eval.md", "\n".join(table) + "\n")
    return out


SUMMARY_KEYS = ("dice_LV_ed", "dice_LV_es", "dice_MYO_ed", "pred_lv_edv", "pred_lv_esv", "pred_lv_ef", "true_lv_edv",
                "true_lv_esv", "true_lv_ef", "lv_ef_abs_err")


def summarise(rows: list[dict]) -> dict[str, float]:
    """Mean of each summary key over the test subjects, skipping undefined values (an EF where no LV was predicted);
    NaN when no subject has one."""
    from cinema_jax.tasks.common import nanmean

    return {k: nanmean(r[k] for r in rows) for k in SUMMARY_KEYS}


def _cell(v: float, fmt: str) -> str:
    return format(v, fmt) if np.isfinite(v) else "n/a"


def markdown_table(out: dict) -> list[str]:
    """One row per (model, test subject): Dice and LV EDV / ESV / EF predicted vs expert contours ('n/a' where a
    value is undefined, e.g. the EF of a model that predicts no LV)."""
    table = ["| model | test subject | LV Dice ED | LV Dice ES | MYO Dice ED | LV EDV pred / GT (mL) | "
             "LV ESV pred / GT (mL) | LV EF pred / GT (%) | LV EF abs err (%) |", "|---" * 9 + "|"]
    for name, m in out["models"].items():
        for r in m["rows"]:
            c = {k: _cell(r[k], ".3f" if k.startswith("dice") else ".0f" if k.endswith(("edv", "esv")) else ".1f")
                 for k in SUMMARY_KEYS}
            table.append(f"| {name} | {r['pid']} | {c['dice_LV_ed']} | {c['dice_LV_es']} | {c['dice_MYO_ed']} | "
                         f"{c['pred_lv_edv']} / {c['true_lv_edv']} | {c['pred_lv_esv']} / {c['true_lv_esv']} | "
                         f"{c['pred_lv_ef']} / {c['true_lv_ef']} | {c['lv_ef_abs_err']} |")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cinema_jax.experiments.sunnybrook_eval", description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--root", default="../shared/data/sunnybrook")
    p.add_argument("--synthetic-ckpt", required=True, nargs="+",
                   help="segmentation workdir(s) trained on synthetic data only")
    p.add_argument("--init-from", default="", help="MAE workdir for the Sunnybrook fine-tune's encoder")
    p.add_argument("--train-subjects", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--spacing", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    # Sunnybrook UIDs have a leading-zero component: pydicom warns once per file. A filter, not a level: importing
    # pydicom resets its logger's level.
    logging.getLogger("pydicom").addFilter(lambda record: record.levelno >= logging.ERROR)
    run(a.workdir, a.root, a.synthetic_ckpt, a.init_from, a.train_subjects, a.steps, a.size, a.spacing, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
