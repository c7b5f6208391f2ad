"""Regression of a study-level value (LV EF by default) from ED + ES with a ConvViT.

Targets are z-scored with `data.target_mean` / `data.target_std` (in the target's units, e.g. EF %) and the loss is
the MSE in z-space (reference). Evaluation reports MAE / RMSE / bias / Pearson r in the restored units and the MAE in
z-space; model selection on `mae` (lower is better). The phantom's `lv_ef` is measured by counting LV voxels (not the
label-value sum of CineMA issue #30), so its mean (~50 %) differs from the reference's ACDC constants (27.7 +- 10.8).
Sample layout: as classify.py with 'target' float32 (z-scored).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cinema_jax.config import get
from cinema_jax.errors import DataError
from cinema_jax.tasks.classify import StudyTask
from cinema_jax.tasks.common import eval_out_dir, write_eval_outputs


class RegressTask(StudyTask):
    name = "regress"
    eval_metric = "mae"
    eval_mode = "min"

    def out_chans(self, config) -> int:
        return 1

    def stats(self, config) -> tuple[float, float]:
        return float(get(config, "data.target_mean")), float(get(config, "data.target_std"))

    def target(self, meta: dict, config, example: bool = False):
        if example:
            return np.float32(0.0)
        col = str(get(config, "data.target"))
        if col not in meta:
            raise DataError(f"record has no '{col}' value for the regression target (data.target)")
        value = float(meta[col])
        if not np.isfinite(value):
            raise DataError(f"record target '{col}' is not finite ({value})")
        mean, std = self.stats(config)
        return np.float32((value - mean) / std)

    def loss(self, model, params, batch, rng, train: bool):
        pred = self.logits(model, params, batch, rng, train)[:, 0]
        err = pred - batch["target"]
        loss = (err * err).mean()
        return loss, {"loss": loss, "mae_z": abs(err).mean()}

    def evaluate(self, model, params, batches: Iterable[dict], config, out_dir=None) -> dict[str, float]:
        from cinema_jax.metrics.classification import regression_metrics

        out, y, ids = self.predictions(model, params, batches)
        mean, std = self.stats(config)
        pred = out[:, 0] * std + mean if len(y) else np.zeros(0)
        true = y * std + mean
        summary = regression_metrics(pred, true) if len(y) else {}
        if len(y):
            summary["mae_z"] = float(np.abs(out[:, 0] - y).mean())
        summary["n_samples"] = float(len(y))
        out_dir = eval_out_dir(config, out_dir)
        if out_dir:
            rows = [{**ids[i], "true": float(true[i]), "pred": float(pred[i])} for i in range(len(y))]
            write_eval_outputs(out_dir, rows, summary)
        return summary


TASK = RegressTask()
