"""Disease classification from ED + ES (ConvViT on the CineMA encoder; frames stacked as 2 input channels).

Records are per subject (phantom phenotypes NOR/DCM/HCM/MINF/ARV by default, or a metadata column of the CineMA
layout such as `pathology` mapped through `data.classes`). Both frames go through ONE draw of the Chen pipeline
(same resampling, crop, spatial and intensity augmentation), so the pair stays aligned.

Sample layout (no batch dim): '<view>' (X, Y, Z, 2) SAX / (X, Y, 2) LAX float32 (channel 0 ED, 1 ES); 'target'
int32 class id (classification) or float32 z-scored value (regression, see regress.py); 'uid' int64; 'pid' (32,)
uint8. Loss: cross-entropy with label smoothing 0.1. Evaluation: accuracy, balanced accuracy, one-vs-rest macro
AUROC, F1, MCC (model selection on MCC, like the reference).
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
    PID_BYTES,
    augment_config,
    eval_out_dir,
    fit_depth,
    load_frame,
    make_source,
    model_config,
    model_image_size,
    model_runtime,
    pid_bytes,
    pid_str,
    split_rng,
    task_view,
    write_eval_outputs,
)


def study_frames(record, config, view: str) -> tuple[np.ndarray, tuple[float, ...], dict, str]:
    """(ED, ES) stacked as (X, Y, Z, 2) (LAX: Z = 1), spacing, metadata, pid."""
    ed = load_frame(record, config, view, "ed")
    es = load_frame(record, config, view, "es")
    if ed["image"].shape != es["image"].shape:
        raise DataError(f"{ed['pid']}: ED {ed['image'].shape} and ES {es['image'].shape} shapes differ")
    stack = np.stack([ed["image"], es["image"]], -1)
    if stack.ndim == 3:
        stack = stack[:, :, None, :]
    return stack.astype(np.float32), ed["spacing"], ed["meta"], ed["pid"]


def preprocess_study(stack: np.ndarray, spacing, rng: np.random.Generator, config, train: bool) -> np.ndarray:
    """(X, Y, Z, 2) ED+ES -> model input (X', Y', Z', 2) SAX or (X', Y', 2) LAX with one pipeline draw."""
    view = task_view(config)
    size = model_image_size(config, view)
    if view == "sax":
        (stack,), _, nz = fit_depth([stack], size[2], rng if train else None)
    out = aug.chen_pipeline(stack, None, spacing, rng, augment_config(config, view, train), train)["image"]
    if view != "sax":
        out = out[:, :, 0, :]
    return out.astype(np.float32)


class StudyTask(Task):
    """Shared ED+ES study-level plumbing for classification and regression (ConvViT)."""

    name = "study"

    def out_chans(self, config) -> int:
        raise ConfigError("StudyTask is abstract: use classify or regress")

    def make_model(self, config):
        from cinema_jax.models import build_convvit

        view = task_view(config)
        return build_convvit(model_config(config, view, out_chans=self.out_chans(config)), **model_runtime(config))

    def source(self, config, split: str):
        return make_source(config, split, phases=("ed",))

    def target(self, meta: dict, config, example: bool = False):
        raise ConfigError("StudyTask is abstract")

    def transform(self, record, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        view = task_view(config)
        stack, spacing, meta, pid = study_frames(record, config, view)
        return {view: preprocess_study(stack, spacing, rng, config, train), "target": self.target(meta, config),
                "uid": np.int64(record.get("uid", 0)), "pid": pid_bytes(pid)}

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        view = task_view(config)
        size = model_image_size(config, view)
        t = self.target({}, config, example=True)
        return {view: np.zeros((batch_size, *size, 2), np.float32),
                "target": np.zeros((batch_size,), np.asarray(t).dtype), "uid": np.zeros((batch_size,), np.int64),
                "pid": np.zeros((batch_size, PID_BYTES), np.uint8)}

    def model_inputs(self, batch) -> dict:
        return {"images": {v: batch[v] for v in VIEWS if v in batch}}

    def logits(self, model, params, batch, rng=None, train: bool = False):
        rngs = split_rng(rng) if rng is not None else None
        return model.apply({"params": params}, **self.model_inputs(batch), train=train, rngs=rngs)

    def predictions(self, model, params, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        import jax

        fn = jax.jit(lambda p, images: model.apply({"params": p}, images, train=False))
        outs, targets, ids = [], [], []
        for batch in batches:
            outs.append(np.asarray(fn(params, self.model_inputs(batch)["images"])))
            targets.append(np.asarray(batch["target"]))
            for i in range(len(batch["target"])):
                ids.append({"pid": pid_str(batch["pid"][i]) if "pid" in batch else "", "uid": int(batch["uid"][i])})
        if not outs:
            return np.zeros((0, 1)), np.zeros((0,)), []
        return np.concatenate(outs), np.concatenate(targets), ids


class ClassifyTask(StudyTask):
    """ConvViT classifier on ED+ES (see module docstring)."""

    name = "classify"
    eval_metric = "mcc"
    eval_mode = "max"

    def class_names(self, config) -> tuple[str, ...]:
        names = get(config, "data.classes")
        if names:
            return tuple(str(n) for n in names)
        from cinema_jax.data.phantom import PHENOTYPES

        return tuple(PHENOTYPES)

    def out_chans(self, config) -> int:
        return len(self.class_names(config))

    def target(self, meta: dict, config, example: bool = False):
        if example:
            return np.int32(0)
        col = str(get(config, "data.target"))
        if col not in meta:
            raise DataError(f"record has no '{col}' column for the class target (data.target)")
        value = meta[col]
        names = self.class_names(config)
        if isinstance(value, (str, np.str_)):
            if str(value) not in names:
                raise DataError(f"class {value!r} (column {col}) is not in data.classes {names}")
            return np.int32(names.index(str(value)))
        k = int(value)
        if not 0 <= k < len(names):
            raise DataError(f"class id {k} (column {col}) out of range for {len(names)} classes")
        return np.int32(k)

    def loss(self, model, params, batch, rng, train: bool):
        import jax
        import jax.numpy as jnp
        import optax

        logits = self.logits(model, params, batch, rng, train)
        n = logits.shape[-1]
        smooth = 0.1
        onehot = jax.nn.one_hot(batch["target"], n) * (1.0 - smooth) + smooth / n
        loss = optax.softmax_cross_entropy(logits, onehot).mean()
        acc = (jnp.argmax(logits, -1) == batch["target"]).mean()
        return loss, {"loss": loss, "accuracy": acc}

    def evaluate(self, model, params, batches: Iterable[dict], config, out_dir=None) -> dict[str, float]:
        import scipy.special

        from cinema_jax.metrics.classification import classification_metrics

        logits, y, ids = self.predictions(model, params, batches)
        names = self.class_names(config)
        probs = scipy.special.softmax(logits, axis=-1)
        summary = classification_metrics(y.astype(np.int64), probs, len(names)) if len(y) else {}
        summary["n_samples"] = float(len(y))
        out_dir = eval_out_dir(config, out_dir)
        if out_dir:
            rows = [{**ids[i], "true": names[int(y[i])], "pred": names[int(probs[i].argmax())],
                     **{f"p_{n}": float(probs[i, k]) for k, n in enumerate(names)}} for i in range(len(y))]
            write_eval_outputs(out_dir, rows, summary)
        return summary


TASK = ClassifyTask()
