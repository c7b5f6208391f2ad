"""Domain shift on the synthetic phantom: train a segmenter on ONE site, test on every site, with and without the
Chen 2019 pipeline.

Arms (same model, steps, data, seed):
  chen      in-plane resampling + per-slice z-score + the full augmentation (cinema_jax.data.augment.DEFAULTS)
  baseline  per-slice min-max to [0, 1] (0-100 percentiles, CineMA-like), no augmentation
Sites A-D differ in tissue contrast, noise, coil bias, in-plane resolution and slice thickness
(cinema_jax.data.phantom.SITES). Prints a Dice table (mean over RV/MYO/LV, and LV; mean ± SD over `--seeds`) and
writes `<workdir>/domain_shift.json` + `domain_shift.md`.

    python -m cinema_jax.experiments.domain_shift --workdir runs/domain_shift --init-from runs/demo/mae
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cinema_jax.fileutil import write_json_atomic, write_text_atomic

SITES = ("A", "B", "C", "D")


def arm_config(arm: str, train_site: str, steps: int, n_train: int, n_test: int, init_from: str, size: int,
               spacing: float, seed: int):
    from cinema_jax.config import load_config

    c = load_config("configs/finetune_seg.py:smoke")
    c.total_steps = steps
    c.batch_size = 4  # the batch the README table was measured with (the smoke config now uses 8)
    c.eval_every = steps
    c.checkpoint_every = steps
    c.image_every = steps
    c.log_every = max(1, steps // 10)
    c.seed = seed
    c.init_from = init_from
    c.model.sax_size = (size, size, 8)
    c.data.phantom.sax_size = (size, size)
    c.data.phantom.sax_spacing = (spacing, spacing, 10.0)
    c.data.n_subjects.train = n_train
    c.data.n_subjects.val = 2
    c.data.n_subjects.test = n_test
    c.data.sites.train = (train_site,)
    c.data.sites.val = (train_site,)
    c.eval_hd95 = False
    c.data.augment.target_spacing = spacing
    if arm == "baseline":
        c.data.augment.normalise = "minmax"
        c.data.augment.minmax_percentiles = (0.0, 100.0)
        c.data.augment_train = False
    else:
        c.data.augment.rotate_deg = 180.0
    return c


METRICS = ("mean_dice", "dice_LV", "dice_MYO", "dice_RV", "lv_ef_mae")


def run(workdir: str, train_site: str = "A", steps: int = 2000, n_train: int = 24, n_test: int = 8,
        init_from: str = "", size: int = 32, spacing: float = 6.0, seeds: tuple[int, ...] = (0,)) -> dict:
    """Train both arms once per seed (same data, the seed varies init, dropout and batch order) and evaluate every
    site. One seed writes `<workdir>/<arm>`, several `<workdir>/seed<k>/<arm>`."""
    from cinema_jax.data import pipeline
    from cinema_jax.tasks import get_task
    from cinema_jax.train.checkpoint import load_params
    from cinema_jax.train.loop import train

    task = get_task("segment")

    root = Path(workdir)
    runs: dict = {}
    for seed in seeds:
        runs[str(seed)] = {}
        for arm in ("baseline", "chen"):
            config = arm_config(arm, train_site, steps, n_train, n_test, init_from, size, spacing, seed)
            wd = root / arm if len(seeds) == 1 else root / f"seed{seed}" / arm
            train(config, wd)
            params, _ = load_params(wd)
            model = task.make_model(config)
            runs[str(seed)][arm] = {}
            for site in SITES:
                config.data.sites.test = (site,)
                m = task.evaluate(model, params, pipeline.eval_batches(task, config, "test"), config,
                                  out_dir=wd / f"eval_site_{site}")
                runs[str(seed)][arm][site] = {k: float(m[k]) for k in METRICS if k in m}
                print(f"seed {seed} {arm:8s} site {site}: mean Dice {m['mean_dice']:.3f}  LV {m['dice_LV']:.3f}",
                      flush=True)
    results = {"train_site": train_site, "steps": steps, "n_train": n_train, "n_test": n_test, "size": size,
               "spacing_mm": spacing, "init_from": init_from, "seeds": list(seeds), "runs": runs,
               "arms": summarise(runs)}
    table = markdown_table(results)
    print(table)
    write_json_atomic(root / "domain_shift.json", results)
    write_text_atomic(root / "domain_shift.md", table + "\n")
    return results


def summarise(runs: dict) -> dict:
    """Per arm and site: each metric's mean over seeds and, with two or more seeds, its sample SD ('<metric>_sd')."""
    out: dict = {}
    per_seed = list(runs.values())
    for arm in per_seed[0]:
        out[arm] = {}
        for site in per_seed[0][arm]:
            cell = {}
            for k in per_seed[0][arm][site]:
                vals = np.array([r[arm][site][k] for r in per_seed], np.float64)
                cell[k] = float(vals.mean())
                if len(vals) > 1:
                    cell[f"{k}_sd"] = float(vals.std(ddof=1))
            out[arm][site] = cell
    return out


def markdown_table(results: dict) -> str:
    """Mean Dice (LV Dice) per arm and site, '± SD' over seeds when there are several, and the mean over the sites
    not trained on."""
    sites = list(next(iter(results["arms"].values())))
    head = "| arm | " + " | ".join(f"site {s}{' (train)' if s == results['train_site'] else ''}" for s in sites)
    lines = [head + " | unseen sites |", "|---" * (len(sites) + 2) + "|"]

    def fmt(cell, k):
        return f"{cell[k]:.3f}" + (f" ± {cell[k + '_sd']:.3f}" if k + "_sd" in cell else "")

    for arm, per in results["arms"].items():
        cells = [f"{fmt(per[s], 'mean_dice')} (LV {fmt(per[s], 'dice_LV')})" for s in sites]
        unseen = [per[s]["mean_dice"] for s in sites if s != results["train_site"]]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {np.mean(unseen):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cinema_jax.experiments.domain_shift", description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--train-site", default="A", choices=SITES)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--init-from", default="", help="MAE workdir whose encoder initialises both arms")
    p.add_argument("--size", type=int, default=32, help="in-plane model size (px)")
    p.add_argument("--spacing", type=float, default=6.0, help="in-plane spacing of phantom and model grid (mm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each arm per seed; the table "
                   "gives mean ± SD over seeds")
    a = p.parse_args(argv)
    run(a.workdir, a.train_site, a.steps, a.n_train, a.n_test, a.init_from, a.size, a.spacing, tuple(a.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
