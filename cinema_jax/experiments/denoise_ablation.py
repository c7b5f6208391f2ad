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
Writes `<workdir>/ablation.json` + `ablation.md` (mean PSNR/SSIM of the magnitude, and the paired difference vs
`full` with its standard error over samples).

    python -m cinema_jax.experiments.denoise_ablation --workdir runs/denoise_ablation --steps 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from cinema_jax.fileutil import write_text_atomic

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


def run(workdir: str, steps: int = 400, n_test: int = 8, seed: int = 0) -> dict:
    from cinema_jax.tasks.denoise import TASK
    from cinema_jax.train.checkpoint import latest_step_dir, load_params
    from cinema_jax.train.loop import train

    root = Path(workdir).absolute()
    results: dict = {"config": "configs/denoise.py:smoke", "steps": steps, "seed": seed, "split": "test",
                     "n_test_subjects": n_test, "arms": {}}
    rows, digest = {}, None
    for arm in ARMS:
        config = arm_config(arm, steps, n_test, seed)
        wd = root / arm
        t0 = time.perf_counter()
        train(config, wd)
        train_s = time.perf_counter() - t0
        params, _ = load_params(latest_step_dir(wd))  # final params, not best/
        rows[arm], d = per_sample(TASK.make_model(config), params, config)
        if digest is not None and d != digest:
            raise RuntimeError(f"arm {arm} was evaluated on different noisy images than the first arm")
        digest = d
        r = rows[arm].mean(axis=0)
        results["arms"][arm] = dict(psnr=r[0], ssim=r[1], psnr_gain=r[0] - r[2], ssim_gain=r[1] - r[3],
                                    train_s=round(train_s, 1), **ARMS[arm])
        print(f"{arm:12s} PSNR {r[0]:.2f} dB (noisy {r[2]:.2f})  SSIM {r[1]:.3f} (noisy {r[3]:.3f})", flush=True)
    noisy = rows["full"][:, 2:].mean(axis=0)
    results["noisy"] = dict(psnr=noisy[0], ssim=noisy[1])
    results["n_samples"] = int(len(rows["full"]))
    results["eval_digest"] = digest
    for arm in ARMS:
        d = rows[arm][:, 0] - rows["full"][:, 0]
        results["arms"][arm]["dpsnr_vs_full"] = float(d.mean())
        results["arms"][arm]["dpsnr_vs_full_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    results = json.loads(json.dumps(results, default=float))
    table = markdown_table(results)
    print(table)
    write_text_atomic(root / "ablation.json", json.dumps(results, indent=1))
    write_text_atomic(root / "ablation.md", table + "\n")
    return results


def markdown_table(results: dict) -> str:
    n = results["n_samples"]
    lines = [f"Held-out: {n} test samples (full noise pipeline, identical for every arm); "
             f"{results['steps']} steps, seed {results['seed']}.", "",
             "| arm | PSNR (dB) | SSIM | dPSNR vs noisy (dB) | dSSIM vs noisy | dPSNR vs full (dB, ±SE) |",
             "|---|---|---|---|---|---|",
             f"| noisy input | {results['noisy']['psnr']:.2f} | {results['noisy']['ssim']:.3f} | 0 | 0 | |"]
    for arm, r in results["arms"].items():
        vs_full = "—" if arm == "full" else f"{r['dpsnr_vs_full']:+.2f} ± {r['dpsnr_vs_full_se']:.2f}"
        lines.append(f"| {arm} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['psnr_gain']:+.2f} | {r['ssim_gain']:+.3f} "
                     f"| {vs_full} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cinema_jax.experiments.denoise_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=400, help="training steps per arm (smoke config: 150)")
    p.add_argument("--n-test", type=int, default=8, help="held-out phantom subjects (x3 long-axis views)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(a.workdir, a.steps, a.n_test, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
