"""SNRAware ablation on the synthetic phantom: does the model need the g-map input and SNR-unit scaling?

Why: the SNRAware claim is that training in SNR units with a g-map channel lets one model handle any noise level and
any parallel-imaging geometry. This trains three arms from `configs/denoise.py:smoke` through the one training loop
(`cinema_jax.train.loop.train`), same seed, steps and training records:
  full         coil-simulated g-maps in the input, SNR-unit scaling (the method)
  no_gmap      `noise.gmap_augment=False`: trained with g = 1 (spatially white noise) and no g-map information
  no_snr_unit  `noise.snr_unit=False`: each sample scaled by its 99th-percentile magnitude instead of SNR units
Each arm's FINAL params (last checkpoint) are scored on one held-out set drawn by the full noise pipeline (the
task's eval transform always uses g-maps + SNR units; `to_model_units` then hands each arm the input convention it
was trained with), so every arm denoises the same noisy images; this is asserted. The noisy input is the baseline.
Writes `<workdir>/ablation.json` + `ablation.md` (mean PSNR/SSIM of the magnitude, the paired difference vs `full`
with its standard error over seeds (over samples with one seed), and PSNR per parallel-imaging acceleration R of the
held-out noise: the same images with g-maps of one R, R = 1 being white noise).

    python -m cinema_jax.experiments.denoise_ablation --workdir runs/denoise_ablation --steps 400 --seeds 0,1
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

from cinema_jax.fileutil import clean_json, write_json_atomic, write_text_atomic

ARMS = {
    "full": dict(gmap_augment=True, snr_unit=True),
    "no_gmap": dict(gmap_augment=False, snr_unit=True),
    "no_snr_unit": dict(gmap_augment=True, snr_unit=False),
}


def arm_config(arm: str, steps: int, n_test: int, seed: int):
    from cinema_jax.config import load_config

    c = load_config("configs/denoise.py:smoke")
    c.total_steps = steps
    c.eval_every = steps
    c.checkpoint_every = steps
    c.image_every = steps
    c.log_every = max(1, steps // 20)
    c.seed = seed
    c.data.n_subjects.test = n_test
    for k, v in ARMS[arm].items():
        c.noise[k] = v
    return c


def per_sample(model, params, config) -> tuple[np.ndarray, str]:
    """(n, 4) rows psnr, ssim, psnr_noisy, ssim_noisy on the test split (one sample per batch), and a digest of the
    clean/noisy images (must be identical across arms)."""
    from cinema_jax.data import pipeline
    from cinema_jax.tasks.denoise import TASK

    rows, h = [], hashlib.sha256()
    for batch in pipeline.eval_batches(TASK, config, "test", batch_size=1):
        h.update(np.ascontiguousarray(batch["clean"]).tobytes())
        h.update(np.ascontiguousarray(batch["noisy"]).tobytes())
        m = TASK.evaluate(model, params, [batch], config)
        rows.append((m["psnr"], m["ssim"], m["psnr_noisy"], m["ssim_noisy"]))
    return np.asarray(rows, np.float64), h.hexdigest()


def _at_acceleration(config, r: int):
    c = config.copy_and_resolve_references()
    c.noise.acceleration = (int(r),)
    return c


def run(workdir: str, steps: int = 400, n_test: int = 8, seeds=(0,), accelerations=(1, 2, 3, 4)) -> dict:
    from cinema_jax.tasks.denoise import TASK
    from cinema_jax.train.checkpoint import latest_step_dir, load_params
    from cinema_jax.train.loop import train

    root = Path(workdir).absolute()
    seeds = tuple(int(s) for s in seeds)
    results: dict = {"config": "configs/denoise.py:smoke", "steps": steps, "seeds": list(seeds), "split": "test",
                     "n_test_subjects": n_test, "accelerations": list(accelerations), "arms": {}}
    rows: dict = {arm: [] for arm in ARMS}  # per seed: (n, 4) psnr, ssim, psnr_noisy, ssim_noisy
    per_r: dict = {arm: {r: [] for r in accelerations} for arm in ARMS}  # per seed: (n, 4) at one acceleration
    digest = None
    for seed in seeds:
        for arm in ARMS:
            config = arm_config(arm, steps, n_test, seed)
            wd = root / (arm if len(seeds) == 1 else f"{arm}_seed{seed}")
            t0 = time.perf_counter()
            train(config, wd)
            train_s = time.perf_counter() - t0
            params, _ = load_params(latest_step_dir(wd))  # final params, not best/
            model = TASK.make_model(config)
            config = arm_config(arm, steps, n_test, seeds[0])  # every seed is scored on the first seed's test set
            r_rows, d = per_sample(model, params, config)
            if digest is not None and d != digest:
                raise RuntimeError(f"arm {arm} was evaluated on different noisy images than the first arm")
            digest = d
            rows[arm].append(r_rows)
            for r in accelerations:  # the same held-out images, noise from one parallel-imaging acceleration
                per_r[arm][r].append(per_sample(model, params, _at_acceleration(config, r))[0])
            m = r_rows.mean(axis=0)
            results["arms"].setdefault(arm, {"train_s": []})["train_s"].append(round(train_s, 1))
            print(f"{arm:12s} seed {seed}  PSNR {m[0]:.2f} dB (noisy {m[2]:.2f})  SSIM {m[1]:.3f} "
                  f"(noisy {m[3]:.3f})", flush=True)
    full = np.stack(rows["full"])  # (seeds, n, 4)
    results["noisy"] = dict(psnr=full[0, :, 2].mean(), ssim=full[0, :, 3].mean())
    results["n_samples"] = int(full.shape[1])
    results["eval_digest"] = digest
    for arm in ARMS:
        a = np.stack(rows[arm])
        r = a.mean(axis=(0, 1))
        # paired difference vs full per sample; SE over seeds when there are several (training noise dominates),
        # else over samples
        diff = (a[..., 0] - full[..., 0]).mean(axis=1)  # per seed
        if len(seeds) > 1:
            se = diff.std(ddof=1) / np.sqrt(len(seeds))
        else:
            d = a[0, :, 0] - full[0, :, 0]
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        results["arms"][arm].update(ARMS[arm], psnr=r[0], ssim=r[1], psnr_gain=r[0] - r[2], ssim_gain=r[1] - r[3],
                                    psnr_per_seed=[float(x) for x in a[..., 0].mean(axis=1)],
                                    dpsnr_vs_full=float(diff.mean()), dpsnr_vs_full_se=float(se))
        results["arms"][arm]["by_acceleration"] = {
            str(rr): dict(psnr=float(np.stack(per_r[arm][rr])[..., 0].mean()),
                          psnr_noisy=float(np.stack(per_r[arm][rr])[..., 2].mean()),
                          dpsnr_vs_full=float((np.stack(per_r[arm][rr])[..., 0]
                                               - np.stack(per_r["full"][rr])[..., 0]).mean()))
            for rr in accelerations}
    results = clean_json(results)
    table = markdown_table(results)
    print(table)
    write_json_atomic(root / "ablation.json", results)
    write_text_atomic(root / "ablation.md", table + "\n")
    return results


def markdown_table(results: dict) -> str:
    n, seeds = results["n_samples"], results["seeds"]
    se_over = "seeds" if len(seeds) > 1 else "samples"
    lines = [f"Held-out: {n} test samples (full noise pipeline, identical for every arm); "
             f"{results['steps']} steps, seeds {', '.join(map(str, seeds))} (means over seeds).", "",
             "| arm | PSNR (dB) | SSIM | dPSNR vs noisy (dB) | dSSIM vs noisy | "
             f"dPSNR vs full (dB, ±SE over {se_over}) |",
             "|---|---|---|---|---|---|",
             f"| noisy input | {results['noisy']['psnr']:.2f} | {results['noisy']['ssim']:.3f} | 0 | 0 | |"]
    for arm, r in results["arms"].items():
        vs_full = "—" if arm == "full" else f"{r['dpsnr_vs_full']:+.2f} ± {r['dpsnr_vs_full_se']:.2f}"
        lines.append(f"| {arm} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['psnr_gain']:+.2f} | {r['ssim_gain']:+.3f} "
                     f"| {vs_full} |")
    accs = results.get("accelerations") or []
    if accs:
        full = results["arms"]["full"]["by_acceleration"]
        lines += ["", "PSNR (dB) by parallel-imaging acceleration R of the held-out noise (same images; R = 1: g = 1; "
                  "in brackets: vs full):", "",
                  "| arm | " + " | ".join(f"R = {r}" for r in accs) + " |", "|---|" + "---|" * len(accs),
                  "| noisy input | " + " | ".join(f"{full[str(r)]['psnr_noisy']:.2f}" for r in accs) + " |"]
        for arm, r in results["arms"].items():
            cells = []
            for acc in accs:
                b = r["by_acceleration"][str(acc)]
                cells.append(f"{b['psnr']:.2f}" + ("" if arm == "full" else f" ({b['dpsnr_vs_full']:+.2f})"))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cinema_jax.experiments.denoise_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=400, help="training steps per arm (smoke config: 150)")
    p.add_argument("--n-test", type=int, default=8, help="held-out phantom subjects (x3 long-axis views)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (several: SE over seeds)")
    p.add_argument("--accelerations", default="1,2,3,4", help="accelerations R for the per-R table ('' for none)")
    a = p.parse_args(argv)
    run(a.workdir, a.steps, a.n_test, tuple(int(x) for x in a.seeds.split(",")),
        tuple(int(x) for x in a.accelerations.split(",") if x.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
