"""Ventricle + myocardium segmentation (ConvUNetR on the CineMA encoder), SAX 3D or LAX 2D, with the Chen pipeline.

Records (numpy, one per (subject, phase): ED and ES are separate samples as in the reference) come from the phantom
(`data.source='synthetic'`, rendered on the fly), the CineMA processed layout (`'cinema_layout'`) or Sunnybrook
(`'sunnybrook'`). `transform` resamples in-plane to `data.augment.target_spacing` mm, crops/pads to the model's
in-plane size, augments (train only) and normalises per slice (cinema_jax.data.augment), then fits z to the model's
slice count (end zero-padding, like CineMA).

Sample layout (no batch dim): '<view>' image (X, Y, Z, 1) SAX / (X, Y, 1) LAX float32; 'label' (X, Y[, Z]) int32;
'weight' same shape float32 (0 on slices without annotation or padding); 'spacing' (3,) mm; 'uid' int64 subject
number; 'phase' int32 (0 ED, 1 ES); 'nz' int32 valid slices; 'pid' (32,) uint8 subject id bytes.

Loss: soft Dice over the softmax foreground classes (BG excluded) + voxel cross-entropy (reference). Evaluation:
per-structure Dice and HD95 (mm), volumes (label-voxel counts x voxel volume) and LV/RV EF per subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from cinema_jax.config import get
from cinema_jax.data import augment as aug
from cinema_jax.data.phantom import VIEWS
from cinema_jax.errors import DataError
from cinema_jax.tasks import common
from cinema_jax.tasks.base import Task


# ================================================================================================ losses (jax)
def dice_ce_loss(logits, labels, weight, n_classes: int):
    """Soft Dice over softmax foreground classes (per sample and class, BG excluded) + weighted cross-entropy.

    logits (B, ..., C) float32, labels (B, ...) int, weight (B, ...) float (0 = ignore voxel).
    Returns (loss, {'dice_loss', 'ce_loss'})."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, n_classes, dtype=jnp.float32)
    w = weight.astype(jnp.float32)[..., None]
    ce = -(onehot * logp).sum(-1) * weight
    ce = ce.sum() / jnp.maximum(weight.sum(), 1.0)
    prob = jnp.exp(logp) * w
    oh = onehot * w
    axes = tuple(range(1, logits.ndim - 1))
    inter = (prob * oh).sum(axes)[:, 1:]
    denom = (prob + oh).sum(axes)[:, 1:]
    smooth = 1e-5
    dice = (2 * inter + smooth) / (denom + smooth)
    dice_loss = 1.0 - dice.mean()
    return dice_loss + ce, {"dice_loss": dice_loss, "ce_loss": ce}


# ================================================================================================ task
class SegmentTask(Task):
    """ConvUNetR segmentation of BG / RV / MYO / LV (see module docstring)."""

    name = "segment"
    eval_metric = "mean_dice"
    eval_mode = "max"

    def make_model(self, config):
        from cinema_jax.models import build_convunetr

        view = common.task_view(config)
        return build_convunetr(common.model_config(config, view), **common.model_runtime(config))

    def source(self, config, split: str):
        return common.make_source(config, split)

    def preprocess(self, frame: Mapping, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        """One loaded frame (see `common.load_frame`) -> a model sample (module docstring layout)."""
        view = common.task_view(config)
        size = common.model_image_size(config, view)
        cfg = common.augment_config(config, view, train)
        img, lab = frame["image"], frame["label"]
        if lab is None:
            lab = np.zeros(img.shape, np.uint8)
        wz = np.ones(img.shape[2] if img.ndim == 3 else 1, np.float32)
        if frame.get("weight_z") is not None:
            wz = np.asarray(frame["weight_z"], np.float32)
        nz = 1
        if view == "sax":
            (img, lab, wz3), _, nz = common.fit_depth([img, lab, wz[None, None, :]], size[2], rng if train else None)
            wz = wz3[0, 0]
        out = aug.chen_pipeline(img, lab, frame["spacing"], rng, cfg, train)
        # per-slice annotation flag (0 on unannotated / padded slices); in-plane everything counts
        w = np.broadcast_to(wz[None, None, :] if view == "sax" else np.float32(1.0), out["label"].shape)
        image = out["image"]
        if view == "sax":
            image = image * (np.arange(image.shape[2]) < nz)[None, None, :]  # padded slices stay exactly 0
        spacing = np.ones(3, np.float32)
        spacing[: len(out["spacing"])] = out["spacing"][:3]
        return {view: image[..., None].astype(np.float32), "label": out["label"].astype(np.int32),
                "weight": (w > 0.5).astype(np.float32), "spacing": spacing, "nz": np.int32(nz)}

    def transform(self, record, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        view = common.task_view(config)
        frame = common.load_frame(record, config, view)
        lab, n_classes = frame["label"], int(get(config, "model.out_chans"))
        if lab is None:
            raise DataError(f"{frame['pid'] or 'record'}: no '{view}' label in this data source (segmentation "
                            "trains and evaluates on '<view>_<phase>_gt' masks; data.with_labels must stay True)")
        if lab.size and int(lab.max()) >= n_classes:
            raise DataError(f"{frame['pid'] or 'record'}: label values {sorted(set(np.unique(lab).tolist()))} "
                            f"outside 0-{n_classes - 1} (model.out_chans={n_classes}: BG, RV, MYO, LV)")
        sample = self.preprocess(frame, rng, config, train)
        sample["uid"] = np.int64(record.get("uid", 0))
        sample["phase"] = np.int32(common.PHASES.index(str(record.get("phase", "ed"))))
        sample["pid"] = common.pid_bytes(frame["pid"])
        return sample

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        view = common.task_view(config)
        size = common.model_image_size(config, view)
        spatial = tuple(size)
        return {view: np.zeros((batch_size, *spatial, 1), np.float32),
                "label": np.zeros((batch_size, *spatial), np.int32),
                "weight": np.ones((batch_size, *spatial), np.float32),
                "spacing": np.ones((batch_size, 3), np.float32), "nz": np.full((batch_size,), spatial[-1], np.int32),
                "uid": np.zeros((batch_size,), np.int64), "phase": np.zeros((batch_size,), np.int32),
                "pid": np.zeros((batch_size, common.PID_BYTES), np.uint8)}

    def model_inputs(self, batch) -> dict:
        return {"images": {v: batch[v] for v in VIEWS if v in batch}}

    def _view_of(self, batch) -> str:
        return next(v for v in VIEWS if v in batch)

    def loss(self, model, params, batch, rng, train: bool):
        view = self._view_of(batch)
        logits = model.apply({"params": params}, **self.model_inputs(batch), train=train,
                             rngs=common.split_rng(rng))[view]
        loss, metrics = dice_ce_loss(logits, batch["label"], batch["weight"], int(model.out_chans))
        return loss, {"loss": loss, **metrics}

    def predict_fn(self, model):
        """Jitted (params, images dict) -> {view: int32 argmax labels, view+'_prob': softmax}."""
        import jax

        @jax.jit
        def fn(params, images):
            logits = model.apply({"params": params}, images, train=False)
            return {v: (jax.numpy.argmax(x, -1).astype(jax.numpy.int32), jax.nn.softmax(x, -1))
                    for v, x in logits.items()}
        return fn

    def evaluate(self, model, params, batches: Iterable[dict], config, out_dir=None) -> dict[str, float]:
        from cinema_jax.metrics import clinical
        from cinema_jax.metrics.segmentation import segmentation_metrics

        fn = self.predict_fn(model)
        rows: list[dict] = []
        hd = bool(get(config, "eval_hd95"))
        for batch in batches:
            view = self._view_of(batch)
            pred = np.asarray(fn(params, {view: batch[view]})[view][0])
            for i in range(pred.shape[0]):
                w = np.asarray(batch["weight"][i]) > 0.5
                if view == "sax":
                    zs = np.nonzero(w.any(axis=(0, 1)))[0]
                    p, t = pred[i][:, :, zs], np.asarray(batch["label"][i])[:, :, zs]
                else:
                    p, t = pred[i] * w, np.asarray(batch["label"][i]) * w
                sp = tuple(float(s) for s in np.asarray(batch["spacing"][i]))
                row = {"pid": common.pid_str(batch["pid"][i]) if "pid" in batch else "", "uid": int(batch["uid"][i]),
                       "phase": common.PHASES[int(batch["phase"][i])]}
                if p.size:
                    row.update(segmentation_metrics(p, t, sp, common.CLASSES, hd=hd))
                    if view == "sax":
                        for name, value in (("lv", 3), ("rv", 1), ("myo", 2)):
                            row[f"pred_{name}_ml"] = clinical.volume_ml(p, value, sp)
                            row[f"true_{name}_ml"] = clinical.volume_ml(t, value, sp)
                rows.append(row)
        summary = summarise_segmentation(rows)
        out_dir = common.eval_out_dir(config, out_dir)
        if out_dir:
            common.write_eval_outputs(out_dir, rows, summary)
        return summary

    def visualize(self, model, params, batch, rng, path) -> None:
        from cinema_jax import viz

        view = self._view_of(batch)
        pred = np.asarray(self.predict_fn(model)(params, {view: batch[view]})[view][0])
        rows, titles = [], []
        for i in range(min(4, pred.shape[0])):
            img = np.asarray(batch[view][i, ..., 0])
            lab = np.asarray(batch["label"][i])
            if view == "sax":
                counts = (lab > 0).sum(axis=(0, 1))
                z = int(np.argmax(counts)) if counts.any() else img.shape[2] // 2
                img, lab, pr = img[:, :, z], lab[:, :, z], pred[i][:, :, z]
            else:
                pr = pred[i]
            rows.append([img, viz.overlay_labels(img, lab), viz.overlay_labels(img, pr)])
            titles.append(f"{i}: img|truth|pred")
        viz.save_png(path, viz.image_grid(rows, titles=titles, scale=max(1, 160 // max(pred.shape[1:3]))))


def summarise_segmentation(rows: list[dict]) -> dict[str, float]:
    """Means of per-sample metrics + per-subject LV/RV EF errors (subjects with both ED and ES)."""
    from cinema_jax.metrics import clinical

    summary: dict[str, float] = {}
    keys = [k for k in (rows[0] if rows else {}) if k.startswith(("dice_", "hd95_", "mean_"))]
    for k in keys:
        summary[k] = common.nanmean(r.get(k, np.nan) for r in rows)
    by_uid: dict[int, dict] = {}
    for r in rows:
        by_uid.setdefault(r["uid"], {})[r["phase"]] = r
    ef_pred, ef_true, rv_pred, rv_true = [], [], [], []
    for pair in by_uid.values():
        if "ed" in pair and "es" in pair and "pred_lv_ml" in pair["ed"]:
            ed, es = pair["ed"], pair["es"]
            ef_pred.append(clinical.ejection_fraction(ed["pred_lv_ml"], es["pred_lv_ml"]))
            ef_true.append(clinical.ejection_fraction(ed["true_lv_ml"], es["true_lv_ml"]))
            rv_pred.append(clinical.ejection_fraction(ed["pred_rv_ml"], es["pred_rv_ml"]))
            rv_true.append(clinical.ejection_fraction(ed["true_rv_ml"], es["true_rv_ml"]))
    if ef_pred:
        summary.update(clinical.error_stats(ef_pred, ef_true, "lv_ef"))
        summary.update(clinical.error_stats(rv_pred, rv_true, "rv_ef"))
    summary["n_samples"] = float(len(rows))
    return summary


TASK = SegmentTask()

__all__ = ["TASK", "SegmentTask", "dice_ce_loss", "summarise_segmentation"]
