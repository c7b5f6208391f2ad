"""LAX landmark localisation (mitral-valve hinges 1, 2 and the apex): heatmap (ConvUNetR) or coordinate (ConvViT).

`model.kind`:
  'heatmap'     ConvUNetR with one output channel per landmark; Gaussian targets (sigma 3 px) scored with soft Dice
                over the sigmoid channels + BCE with logits; coordinates read out by soft-argmax (beta 1000) of the
                sigmoid maps (reference).
  'coordinate'  ConvViT regressing (x1, y1, x2, y2, x3, y3) / (X, Y); Wing loss (w = 10, eps = 2) on the pixel
                coordinates plus Wing on each point's offset from the mean of the other two (reference).
Training renders a random cine frame per step (landmarks exist for every phantom frame); evaluation uses ED and ES,
so per-subject GLS-style strain and MAPSE (two-frame) errors are reported with the localisation errors in mm.

Sample layout: '<view>' (X, Y, 1) float32; 'landmarks' (3, 2) float32 pixel (x, y) in the model grid; 'spacing' (3,)
mm; 'uid' int64; 'phase' int32 (0 ED, 1 ES, 2 other); 'pid' (32,) uint8.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cinema_jax.config import get
from cinema_jax.data import augment as aug
from cinema_jax.data.phantom import VIEWS
from cinema_jax.errors import ConfigError, DataError
from cinema_jax.tasks.base import Task
from cinema_jax.tasks.common import (
    PHASES,
    PID_BYTES,
    augment_config,
    eval_out_dir,
    load_frame,
    make_source,
    model_config,
    model_image_size,
    model_runtime,
    nanmean,
    pid_bytes,
    pid_str,
    render_synthetic,
    split_rng,
    task_view,
    write_eval_outputs,
)

N_LANDMARKS = 3
KINDS = ("heatmap", "coordinate")


def wing(x, w: float = 10.0, eps: float = 2.0):
    """Wing loss (Feng et al. 2018) of residuals x: log-shaped below w, linear above, continuous at |x| = w."""
    import jax.numpy as jnp

    a = jnp.abs(x)
    c = w - w * jnp.log1p(w / eps)
    return jnp.where(a < w, w * jnp.log1p(a / eps), a - c)


def _rel(p):
    """Each point minus the mean of the other two: (B, 3, 2)."""
    import jax.numpy as jnp

    total = p.sum(1, keepdims=True)
    return p - (total - p) / 2.0 if p.shape[1] == 3 else p - jnp.mean(p, 1, keepdims=True)


class LandmarkTask(Task):
    name = "landmark"
    eval_metric = "mean_distance"
    eval_mode = "min"

    def kind(self, config) -> str:
        k = str(get(config, "model.kind"))
        if k not in KINDS:
            raise ConfigError(f"model.kind={k!r} is unknown; choose from {KINDS}")
        return k

    def make_model(self, config):
        from cinema_jax.models import build_convunetr, build_convvit

        view = task_view(config)
        if view == "sax":
            raise ConfigError("landmarks live on LAX views: set data.view to lax_2c, lax_3c or lax_4c")
        kw = model_runtime(config)
        if self.kind(config) == "heatmap":
            return build_convunetr(model_config(config, view, out_chans=N_LANDMARKS), **kw)
        return build_convvit(model_config(config, view, out_chans=2 * N_LANDMARKS), **kw)

    def source(self, config, split: str):
        return make_source(config, split, synthetic_phases=("train",) if split == "train" else PHASES)

    def transform(self, record, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        view = task_view(config)
        phase = str(record.get("phase", "ed"))
        if record.get("kind") == "synthetic" and phase == "train":
            n_frames = int(get(config, "data.phantom.n_frames"))
            t = int(rng.integers(n_frames))
            rendered, meta = render_synthetic(record, config, view, frames=(t,))
            frame = {"image": rendered[view][0], "spacing": tuple(float(s) for s in rendered[f"{view}_spacing"]),
                     "landmarks": rendered[f"{view}_landmarks"][0],
                     "pid": f"synth_{int(record['seed'])}_{int(record['index'])}"}
            phase_id = 2
        else:
            frame = load_frame(record, config, view)
            phase_id = PHASES.index(phase) if phase in PHASES else 2
        if frame.get("landmarks") is None:
            raise DataError(f"{frame.get('pid', 'record')}: no '{view}' landmarks in this data source")
        cfg = augment_config(config, view, train)
        out = aug.chen_pipeline(frame["image"], None, frame["spacing"], rng, cfg, train, points=frame["landmarks"])
        spacing = np.ones(3, np.float32)
        spacing[:2] = out["spacing"][:2]
        return {view: out["image"][..., None].astype(np.float32), "landmarks": out["points"].astype(np.float32),
                "spacing": spacing, "uid": np.int64(record.get("uid", 0)), "phase": np.int32(phase_id),
                "pid": pid_bytes(frame["pid"])}

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        view = task_view(config)
        size = model_image_size(config, view)
        return {view: np.zeros((batch_size, *size, 1), np.float32),
                "landmarks": np.zeros((batch_size, N_LANDMARKS, 2), np.float32),
                "spacing": np.ones((batch_size, 3), np.float32), "uid": np.zeros((batch_size,), np.int64),
                "phase": np.zeros((batch_size,), np.int32), "pid": np.zeros((batch_size, PID_BYTES), np.uint8)}

    def model_inputs(self, batch) -> dict:
        return {"images": {v: batch[v] for v in VIEWS if v in batch}}

    @staticmethod
    def _view(batch) -> str:
        return next(v for v in VIEWS if v in batch)

    def _is_heatmap(self, model) -> bool:
        return hasattr(model, "dec_chans")

    def coords(self, model, out, shape):
        """Model output -> (B, 3, 2) pixel coordinates."""
        import jax

        from cinema_jax.models.landmark import heatmap_soft_argmax

        if self._is_heatmap(model):
            return heatmap_soft_argmax(jax.nn.sigmoid(out))
        return out.reshape(out.shape[0], N_LANDMARKS, 2) * np.asarray(shape[:2], np.float32)

    def loss(self, model, params, batch, rng, train: bool):
        import jax.numpy as jnp
        import optax

        from cinema_jax.models.landmark import landmark_heatmaps

        view = self._view(batch)
        shape = batch[view].shape[1:3]
        out = model.apply({"params": params}, **self.model_inputs(batch), train=train, rngs=split_rng(rng))
        true = batch["landmarks"]
        if self._is_heatmap(model):
            logits = out[view]
            target = landmark_heatmaps(true, shape, sigma=3.0)
            bce = optax.sigmoid_binary_cross_entropy(logits, target).mean()
            prob = jnp.exp(-jnp.logaddexp(0.0, -logits))
            inter = (prob * target).sum((1, 2))
            dice = (2 * inter + 1e-5) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1e-5)
            dice_loss = 1.0 - dice.mean()
            loss = dice_loss + bce
            return loss, {"loss": loss, "dice_loss": dice_loss, "bce_loss": bce}
        pred = self.coords(model, out, shape)
        loss = wing(pred - true).mean() + wing(_rel(pred) - _rel(true)).mean()
        dist = jnp.sqrt(((pred - true) ** 2).sum(-1)).mean()
        return loss, {"loss": loss, "pixel_distance": dist}

    def predict_fn(self, model):
        import jax

        def fn(params, images):
            out = model.apply({"params": params}, images, train=False)
            view = next(iter(images))
            raw = out[view] if isinstance(out, dict) else out
            return self.coords(model, raw, images[view].shape[1:3])
        return jax.jit(fn)

    def evaluate(self, model, params, batches: Iterable[dict], config, out_dir=None) -> dict[str, float]:
        from cinema_jax.metrics import landmark as lm

        fn = self.predict_fn(model)
        rows, pairs = [], {}
        for batch in batches:
            view = self._view(batch)
            pred = np.asarray(fn(params, {view: batch[view]}))
            for i in range(pred.shape[0]):
                sp = tuple(float(s) for s in np.asarray(batch["spacing"][i])[:2])
                true = np.asarray(batch["landmarks"][i])
                err = lm.landmark_errors_mm(pred[i], true, sp)
                phase = int(batch["phase"][i])
                row = {"pid": pid_str(batch["pid"][i]), "uid": int(batch["uid"][i]),
                       "phase": PHASES[phase] if phase < 2 else "other",
                       **{f"dist_{n}": float(e) for n, e in zip(lm.LANDMARK_NAMES, err)},
                       "mean_distance": float(err.mean())}
                rows.append(row)
                pairs.setdefault(row["uid"], {})[row["phase"]] = (pred[i], true, sp)
        summary = {k: nanmean(r[k] for r in rows) for k in (rows[0] if rows else {}) if k.startswith(
            ("dist_", "mean_distance"))}
        gls_err, mapse_err = [], []
        for pair in pairs.values():
            if "ed" in pair and "es" in pair:
                sp = pair["ed"][2]
                p = np.stack([pair["ed"][0], pair["es"][0]])
                t = np.stack([pair["ed"][1], pair["es"][1]])
                gls_err.append(abs(lm.gls_percent(p, sp, 0, 1) - lm.gls_percent(t, sp, 0, 1)))
                mapse_err.append(abs(lm.mapse_mm(p, sp, 0) - lm.mapse_mm(t, sp, 0)))
        if gls_err:
            summary["gls_mae"] = nanmean(gls_err)
            summary["mapse_mae_mm"] = nanmean(mapse_err)
        summary["n_samples"] = float(len(rows))
        out_dir = eval_out_dir(config, out_dir)
        if out_dir:
            write_eval_outputs(out_dir, rows, summary)
        return summary

    def visualize(self, model, params, batch, rng, path) -> None:
        from cinema_jax import viz

        view = self._view(batch)
        pred = np.asarray(self.predict_fn(model)(params, {view: batch[view]}))
        panels = []
        for i in range(min(4, pred.shape[0])):
            img = np.asarray(batch[view][i, ..., 0])
            panels.append([viz.draw_landmarks(img, np.asarray(batch["landmarks"][i]), size=2),
                           viz.draw_landmarks(img, pred[i], size=2)])
        scale = max(1, 160 // max(batch[view].shape[1:3]))
        viz.save_png(path, viz.image_grid(panels, titles=["truth | prediction"] * len(panels), scale=scale))


TASK = LandmarkTask()
