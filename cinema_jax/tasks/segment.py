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
This module also holds the data helpers the other fine-tuning tasks share.
"""

from __future__ import annotations

import csv
import functools
import io as _io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cinema_jax.data import augment as aug
from cinema_jax.errors import ConfigError, DataError

try:  # shared base class (train owner); the protocol is duck-typed, so the task works without it
    from cinema_jax.tasks.base import Task as _TaskBase
except ImportError:  # pragma: no cover - only while base.py is absent
    _TaskBase = object

CLASSES = {"RV": 1, "MYO": 2, "LV": 3}
VIEWS = ("sax", "lax_2c", "lax_3c", "lax_4c")
PHASES = ("ed", "es")
PID_BYTES = 32


# ================================================================================================ config helpers
def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for dicts and ConfigDicts (dotted keys walk nested levels); `default` when absent."""
    cur = cfg
    for part in key.split("."):
        if cur is None:
            return default
        try:
            if part in cur:
                cur = cur[part]
                continue
        except TypeError:
            pass
        if hasattr(cur, part) and not isinstance(cur, Mapping):
            cur = getattr(cur, part)
            continue
        return default
    return cur


def plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict / tuples -> dicts and lists (for json and dataclass kwargs)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def task_view(config) -> str:
    view = str(cfg_get(config, "data.view", "sax"))
    if view not in VIEWS:
        raise ConfigError(f"data.view={view!r} is unknown; choose from {VIEWS}")
    return view


def model_image_size(config, view: str) -> tuple[int, ...]:
    """The model's input size for `view`: model.image_size[view], else model.sax_size / lax_size, else defaults."""
    sizes = cfg_get(config, "model.image_size")
    if sizes is not None and cfg_get(sizes, view) is not None:
        return tuple(int(s) for s in cfg_get(sizes, view))
    if view == "sax":
        return tuple(int(s) for s in cfg_get(config, "model.sax_size", (192, 192, 16)))
    return tuple(int(s) for s in cfg_get(config, "model.lax_size", (256, 256)))


def model_runtime(config) -> dict:
    """The model factories' run-time keyword arguments from the task config: compute dtype, remat, attention, conv."""
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if cfg_get(config, "precision", "float32") == "bfloat16" else jnp.float32
    return dict(dtype=dtype, remat=cfg_get(config, "remat", "none"), attention_impl=cfg_get(config, "attention"),
                conv_impl=cfg_get(config, "conv", "auto"))


def model_config(config, view: str, **extra) -> dict:
    """config.model as a plain dict with views / image_size pinned to the task's single view."""
    m = plain(cfg_get(config, "model", {})) or {}
    m.pop("kind", None)
    m["views"] = [view]
    m["image_size"] = {view: list(model_image_size(config, view))}
    m.pop("sax_size", None)
    m.pop("lax_size", None)
    m.update(extra)
    return m


def augment_config(config, view: str, train: bool) -> dict:
    """data.augment merged over the Chen defaults, crop pinned to the model's in-plane size."""
    over = plain(cfg_get(config, "data.augment", {})) or {}
    try:
        cfg = aug.merge_config(over)
    except ValueError as err:
        raise ConfigError(f"data.augment: {err}") from None
    if not cfg_get(config, "data.augment_train", True) or not train:
        cfg = aug.no_augmentation(cfg)
    cfg["crop_size"] = tuple(model_image_size(config, view)[:2])
    return cfg


def pid_bytes(pid: str) -> np.ndarray:
    raw = str(pid).encode()[:PID_BYTES].ljust(PID_BYTES, b"\0")
    return np.frombuffer(raw, np.uint8).copy()


def pid_str(arr: np.ndarray) -> str:
    return bytes(np.asarray(arr, np.uint8)).rstrip(b"\0").decode(errors="replace")


# ================================================================================================ phantom
def phantom_config(config, split: str):
    """PhantomConfig from data.phantom (sizes / spacing / frames) and data.sites[split] (site presets)."""
    from cinema_jax.data import phantom

    kw = plain(cfg_get(config, "data.phantom", {})) or {}
    sites = cfg_get(config, "data.sites")
    if sites is not None:
        s = cfg_get(sites, split) if (isinstance(sites, Mapping) or hasattr(sites, "keys")) else sites
        if s is not None:
            kw["sites"] = [s] if isinstance(s, str) else list(s)
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    try:
        return phantom.PhantomConfig(**kw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.phantom / data.sites: {err}") from None


@functools.lru_cache(maxsize=256)
def _render(seed: int, index: int, frames: tuple, views: tuple, pcfg) -> tuple[dict, dict]:
    from cinema_jax.data import phantom

    sub = phantom.sample_subject(seed, index, pcfg)
    meta = phantom.subject_metadata(sub, pcfg)
    ed, es = int(meta["ed_frame"]), int(meta["es_frame"])
    frames = tuple(ed if f == "ed" else es if f == "es" else int(f) for f in frames)
    out = phantom.render(sub, list(frames), views, pcfg, labels=True)
    return out, meta


def render_synthetic(record: Mapping, config, view: str, frames=("ed", "es")) -> tuple[dict, dict]:
    """Rendered phantom views for a synthetic record ('seed', 'index', 'split'); cached per process."""
    pcfg = phantom_config(config, str(record.get("split", "train")))
    return _render(int(record["seed"]), int(record["index"]), tuple(frames), (view,), pcfg)


SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


def n_subjects(config, split: str, default: int = 16) -> int:
    n = cfg_get(config, "data.n_subjects", default)
    if isinstance(n, Mapping) or hasattr(n, "keys"):
        n = cfg_get(n, split, default)
    return int(n)


def synthetic_records(config, split: str, phases=PHASES) -> list[dict]:
    seed = int(cfg_get(config, "data.seed", 0))
    off = SPLIT_OFFSETS.get(split, 3_000_000)
    return [{"kind": "synthetic", "seed": seed, "index": off + i, "uid": off + i, "split": split, "phase": p}
            for i in range(n_subjects(config, split)) for p in phases]


# ================================================================================================ sources
class PhaseSource:
    """Random-access source over (subject, phase) pairs of a subject-level source (layout or Sunnybrook volume)."""

    def __init__(self, base, phases=PHASES, kind: str = "layout"):
        self.base, self.phases, self.kind = base, tuple(phases), kind

    def __len__(self) -> int:
        return len(self.base) * len(self.phases)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        rec = dict(self.base[i // len(self.phases)])
        rec["phase"] = self.phases[i % len(self.phases)]
        rec["uid"] = i // len(self.phases)
        rec["kind"] = self.kind
        return rec

    def __repr__(self) -> str:
        return f"PhaseSource({self.base!r}, phases={self.phases}, kind={self.kind!r})"


class SunnybrookPhaseSource:
    """Sunnybrook items (already one per (subject, phase)) with the fields the tasks read."""

    def __init__(self, base, phases=PHASES):
        self.base = base
        self.index = [i for i in range(len(base)) if base[i]["phase"] in phases]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        rec = dict(self.base[self.index[int(i)]])
        rec["kind"] = "sunnybrook"
        rec["uid"] = self.index[int(i)] // 2
        return rec

    def __repr__(self) -> str:
        return f"SunnybrookPhaseSource({self.base!r}, n={len(self)})"


def make_source(config, split: str, phases=PHASES, synthetic_phases=None):
    """grain.MapDataset of phase-level records for the configured data.source."""
    import grain

    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r}; use train, val or test")
    name = cfg_get(config, "data.source", "synthetic")
    if name == "synthetic":
        return grain.MapDataset.source(synthetic_records(config, split, synthetic_phases or phases))
    from cinema_jax.data import datasets

    data_cfg = cfg_get(config, "data")
    if name == "cinema_layout":
        return grain.MapDataset.source(PhaseSource(datasets.cinema_layout_source(data_cfg, split), phases))
    if name == "sunnybrook":
        ph = phases
        if split == "train" and cfg_get(config, "data.sunnybrook_train_ed_only", True):
            ph = ("ed",)  # ES contours lack the epicardium: MYO would be taught as background
        return grain.MapDataset.source(SunnybrookPhaseSource(datasets.sunnybrook_source(data_cfg, split), ph))
    if name == "arrayrecord":
        return grain.MapDataset.source(PhaseSource(datasets.arrayrecord_source(data_cfg, split), phases))
    raise ConfigError(f"data.source={name!r} is unknown; choose from synthetic, cinema_layout, arrayrecord, "
                      "sunnybrook")


def load_frame(record: Mapping, config, view: str, phase: str | None = None) -> dict:
    """{'image' (X, Y[, Z]) float32, 'label' uint8 or None, 'weight_z' (Z,) or None, 'spacing' tuple, 'pid', 'meta',
    'landmarks' (3, 2) or None} for the record's (or the given) phase, whatever the source."""
    phase = str(phase or record.get("phase", "ed"))
    kind = record.get("kind", "synthetic")
    if kind == "synthetic":
        rendered, meta = render_synthetic(record, config, view)
        k = PHASES.index(phase) if phase in PHASES else 0
        lm = rendered.get(f"{view}_landmarks")
        return {"image": rendered[view][k], "label": rendered[f"{view}_label"][k], "weight_z": None,
                "spacing": tuple(float(s) for s in rendered[f"{view}_spacing"]),
                "pid": f"synth_{int(record['seed'])}_{int(record['index'])}", "meta": meta,
                "landmarks": None if lm is None else lm[k]}
    if kind == "sunnybrook":
        if "annotated" not in record or view != "sax":
            raise ConfigError(f"Sunnybrook records are SAX volumes: use data.mode='volume' and data.view='sax' "
                              f"(got view {view!r}, {'slice' if 'slice' in record else 'volume'} items)")
        img = np.asarray(record["sax"], np.float32)
        return {"image": img, "label": np.asarray(record["sax_gt"], np.uint8),
                "weight_z": np.asarray(record["annotated"], np.float32),
                "spacing": tuple(float(s) for s in record["sax_spacing"]), "pid": str(record["pid"]), "meta": {},
                "landmarks": None}
    where = f"record {record.get('pid', record.get('uid', '?'))}"
    for key in (f"{view}_{phase}", f"{view}_spacing"):
        if key not in record:
            raise DataError(f"{where}: no {key!r} array (data.view={view!r}, phase {phase!r})")
    img = np.asarray(record[f"{view}_{phase}"], np.float32)
    lab = record.get(f"{view}_{phase}_gt")
    lm = record.get(f"{view}_{phase}_landmarks")
    meta = {k: v for k, v in record.items() if np.ndim(v) == 0}
    frame = {"image": img, "label": None if lab is None else np.asarray(lab), "weight_z": None,
             "spacing": np.asarray(record[f"{view}_spacing"], np.float64).reshape(-1),
             "pid": str(record.get("pid", "")), "meta": meta,
             "landmarks": None if lm is None else np.asarray(lm, np.float32)}
    return check_frame(frame, view, f"{where} {view}_{phase}")


def check_frame(frame: dict, view: str, where: str) -> dict:
    """Refuse a loaded layout/ArrayRecord frame that would train on garbage: image of the wrong dimensionality or
    with NaN/Inf, spacing not finite and positive, label of another shape or not integral, landmarks not (3, 2)."""
    img, ndim = frame["image"], 3 if view == "sax" else 2
    if img.ndim != ndim:
        raise DataError(f"{where}: image must be {ndim}-D for view {view!r}, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise DataError(f"{where}: image holds {int((~np.isfinite(img)).sum())} NaN/Inf values")
    sp = frame["spacing"]
    if sp.size < ndim or not (np.isfinite(sp[:ndim]).all() and (sp[:ndim] > 0).all()):
        raise DataError(f"{where}: spacing {sp.tolist()} must hold {ndim} finite positive values (mm)")
    frame["spacing"] = tuple(float(s) for s in sp)
    lab = frame["label"]
    if lab is not None:
        if lab.shape != img.shape:
            raise DataError(f"{where}: label shape {lab.shape} differs from image shape {img.shape}")
        if lab.dtype.kind not in "iub" and not (np.isfinite(lab).all() and np.array_equal(lab, np.round(lab))):
            raise DataError(f"{where}: label holds non-integer values")
        if lab.size and (lab.min() < 0 or lab.max() > 255):
            raise DataError(f"{where}: label values {int(lab.min())}..{int(lab.max())} outside 0-255")
        frame["label"] = lab.astype(np.uint8)
    lm = frame["landmarks"]
    if lm is not None:
        if lm.shape != (3, 2) or not np.isfinite(lm).all():
            raise DataError(f"{where}: landmarks must be a finite (3, 2) array, got shape {lm.shape}")
        # pixel (x, y) = (axis 0, axis 1); a point off the image is swapped axes, mm instead of px, or another grid
        extent = np.asarray(img.shape[:2], np.float32) - 0.5
        if (lm < -0.5).any() or (lm > extent).any():
            raise DataError(f"{where}: landmarks {np.round(lm, 1).tolist()} lie outside the {img.shape[:2]} image "
                            "(expected pixel (x, y) along axes 0 and 1)")
    return frame


def fit_depth(arrays: list[np.ndarray | None], depth: int, rng: np.random.Generator | None) -> tuple[list, int, int]:
    """Crop (random window if rng, else the first `depth`) or end-zero-pad axis 2 to `depth`.

    Returns (arrays, start slice, number of valid slices)."""
    ref = next(a for a in arrays if a is not None)
    nz = ref.shape[2]
    start = 0
    if nz > depth:
        start = int(rng.integers(0, nz - depth + 1)) if rng is not None else 0
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        a = a[:, :, start:start + depth]
        if a.shape[2] < depth:
            pad = [(0, 0)] * a.ndim
            pad[2] = (0, depth - a.shape[2])
            a = np.pad(a, pad)
        out.append(a)
    return out, start, min(nz, depth)


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


def split_rng(rng):
    import jax

    k1, k2 = jax.random.split(rng)
    return {"dropout": k1, "droppath": k2}


# ================================================================================================ outputs
def write_eval_outputs(out_dir, rows: list[dict], summary: Mapping[str, float], name: str = "metrics") -> None:
    """`<out_dir>/<name>.csv` (one row per sample / subject) and `<out_dir>/<name>_summary.json`, atomically."""
    from cinema_jax.fileutil import write_json_atomic, write_text_atomic

    out = Path(out_dir)
    if rows:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        write_text_atomic(out / f"{name}.csv", buf.getvalue())
    write_json_atomic(out / f"{name}_summary.json", summary, sort_keys=True)


def nanmean(values: Iterable[float]) -> float:
    vals = np.asarray([v for v in values], np.float64)
    return float(np.nanmean(vals)) if vals.size and np.isfinite(vals).any() else float("nan")


def _out_dir(config, out_dir):
    return out_dir if out_dir is not None else (cfg_get(config, "eval_dir") or None)


# ================================================================================================ task
class SegmentTask(_TaskBase):
    """ConvUNetR segmentation of BG / RV / MYO / LV (see module docstring)."""

    name = "segment"
    eval_metric = "mean_dice"
    eval_mode = "max"

    def make_model(self, config):
        from cinema_jax.models import build_convunetr

        view = task_view(config)
        return build_convunetr(model_config(config, view), **model_runtime(config))

    def source(self, config, split: str):
        return make_source(config, split)

    def preprocess(self, frame: Mapping, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        """One loaded frame (see `load_frame`) -> a model sample (module docstring layout)."""
        view = task_view(config)
        size = model_image_size(config, view)
        cfg = augment_config(config, view, train)
        img, lab = frame["image"], frame["label"]
        if lab is None:
            lab = np.zeros(img.shape, np.uint8)
        wz = np.ones(img.shape[2] if img.ndim == 3 else 1, np.float32)
        if frame.get("weight_z") is not None:
            wz = np.asarray(frame["weight_z"], np.float32)
        nz = 1
        if view == "sax":
            (img, lab, wz3), _, nz = fit_depth([img, lab, wz[None, None, :]], size[2], rng if train else None)
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
        view = task_view(config)
        frame = load_frame(record, config, view)
        lab, n_classes = frame["label"], int(cfg_get(config, "model.out_chans", 4))
        if lab is None:
            raise DataError(f"{frame['pid'] or 'record'}: no '{view}' label in this data source (segmentation "
                            "trains and evaluates on '<view>_<phase>_gt' masks; data.with_labels must stay True)")
        if lab.size and int(lab.max()) >= n_classes:
            raise DataError(f"{frame['pid'] or 'record'}: label values {sorted(set(np.unique(lab).tolist()))} "
                            f"outside 0-{n_classes - 1} (model.out_chans={n_classes}: BG, RV, MYO, LV)")
        sample = self.preprocess(frame, rng, config, train)
        sample["uid"] = np.int64(record.get("uid", 0))
        sample["phase"] = np.int32(PHASES.index(str(record.get("phase", "ed"))))
        sample["pid"] = pid_bytes(frame["pid"])
        return sample

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        view = task_view(config)
        size = model_image_size(config, view)
        spatial = tuple(size)
        return {view: np.zeros((batch_size, *spatial, 1), np.float32),
                "label": np.zeros((batch_size, *spatial), np.int32),
                "weight": np.ones((batch_size, *spatial), np.float32),
                "spacing": np.ones((batch_size, 3), np.float32), "nz": np.full((batch_size,), spatial[-1], np.int32),
                "uid": np.zeros((batch_size,), np.int64), "phase": np.zeros((batch_size,), np.int32),
                "pid": np.zeros((batch_size, PID_BYTES), np.uint8)}

    def model_inputs(self, batch) -> dict:
        return {"images": {v: batch[v] for v in VIEWS if v in batch}}

    def _view_of(self, batch) -> str:
        return next(v for v in VIEWS if v in batch)

    def loss(self, model, params, batch, rng, train: bool):
        view = self._view_of(batch)
        logits = model.apply({"params": params}, **self.model_inputs(batch), train=train, rngs=split_rng(rng))[view]
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
        hd = bool(cfg_get(config, "eval_hd95", True))
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
                row = {"pid": pid_str(batch["pid"][i]) if "pid" in batch else "", "uid": int(batch["uid"][i]),
                       "phase": PHASES[int(batch["phase"][i])]}
                if p.size:
                    row.update(segmentation_metrics(p, t, sp, CLASSES, hd=hd))
                    if view == "sax":
                        for name, value in (("lv", 3), ("rv", 1), ("myo", 2)):
                            row[f"pred_{name}_ml"] = clinical.volume_ml(p, value, sp)
                            row[f"true_{name}_ml"] = clinical.volume_ml(t, value, sp)
                rows.append(row)
        summary = summarise_segmentation(rows)
        out_dir = _out_dir(config, out_dir)
        if out_dir:
            write_eval_outputs(out_dir, rows, summary)
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
        summary[k] = nanmean(r.get(k, np.nan) for r in rows)
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

__all__ = ["TASK", "SegmentTask", "dice_ce_loss", "load_frame", "make_source", "summarise_segmentation"]
