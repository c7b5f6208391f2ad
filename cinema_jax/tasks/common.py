"""What every fine-tuning task shares: config readers for the model and augmentation, phantom / layout / Sunnybrook
/ ArrayRecord records at (subject, phase) level, one frame loaded and checked whatever its source, the z fit, the rng
split for dropout / drop-path, and the eval CSV + summary writer.

Why one module: segmentation, classification, regression and landmarks read the same records through the same
preprocessing; each task module then holds only what is its own (model, loss, metrics). Tasks import this, never
each other.
"""

from __future__ import annotations

import csv
import functools
import io as _io
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from cinema_jax.config import get, to_plain
from cinema_jax.data import augment as aug
from cinema_jax.data.phantom import VIEWS
from cinema_jax.errors import ConfigError, DataError

CLASSES = {"RV": 1, "MYO": 2, "LV": 3}
PHASES = ("ed", "es")
PID_BYTES = 32


# ================================================================================================ config
def task_view(config) -> str:
    view = str(get(config, "data.view"))
    if view not in VIEWS:
        raise ConfigError(f"data.view={view!r} is unknown; choose from {VIEWS}")
    return view


def model_image_size(config, view: str) -> tuple[int, ...]:
    """The model's input size for `view`: model.image_size[view], else model.sax_size / lax_size, else defaults."""
    sizes = get(config, "model.image_size", None)  # optional: the model factories' per-view form
    if sizes is not None and get(sizes, view, None) is not None:
        return tuple(int(s) for s in get(sizes, view))
    return tuple(int(s) for s in get(config, "model.sax_size" if view == "sax" else "model.lax_size"))


def model_runtime(config) -> dict:
    """The model factories' run-time keyword arguments from the task config: compute dtype, remat, attention, conv."""
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if get(config, "precision") == "bfloat16" else jnp.float32
    return dict(dtype=dtype, remat=get(config, "remat"), attention_impl=get(config, "attention"),
                conv_impl=get(config, "conv"))


def model_config(config, view: str, **extra) -> dict:
    """config.model as a plain dict with views / image_size pinned to the task's single view."""
    m = to_plain(get(config, "model"))
    m.pop("kind", None)
    m["views"] = [view]
    m["image_size"] = {view: list(model_image_size(config, view))}
    m.pop("sax_size", None)
    m.pop("lax_size", None)
    m.update(extra)
    return m


def augment_config(config, view: str, train: bool) -> dict:
    """data.augment merged over the Chen defaults, crop pinned to the model's in-plane size."""
    over = to_plain(get(config, "data.augment"))
    try:
        cfg = aug.merge_config(over)
    except ValueError as err:
        raise ConfigError(f"data.augment: {err}") from None
    if not get(config, "data.augment_train") or not train:
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

    kw = to_plain(get(config, "data.phantom"))
    sites = get(config, "data.sites")
    if sites is not None:
        s = get(sites, split) if (isinstance(sites, Mapping) or hasattr(sites, "keys")) else sites
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


def n_subjects(config, split: str) -> int:
    """data.n_subjects: one number for every split, or one per split."""
    n = get(config, "data.n_subjects")
    return int(get(n, split) if hasattr(n, "keys") else n)


def synthetic_records(config, split: str, phases=PHASES) -> list[dict]:
    seed = int(get(config, "data.seed"))
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
    name = get(config, "data.source")
    if name == "synthetic":
        return grain.MapDataset.source(synthetic_records(config, split, synthetic_phases or phases))
    from cinema_jax.data import sources

    data_cfg = get(config, "data")
    if name == "cinema_layout":
        return grain.MapDataset.source(PhaseSource(sources.cinema_layout_source(data_cfg, split), phases))
    if name == "sunnybrook":
        ph = phases
        if split == "train" and get(config, "data.sunnybrook_train_ed_only"):
            ph = ("ed",)  # ES contours lack the epicardium: MYO would be taught as background
        return grain.MapDataset.source(SunnybrookPhaseSource(sources.sunnybrook_source(data_cfg, split), ph))
    if name == "arrayrecord":
        return grain.MapDataset.source(PhaseSource(sources.arrayrecord_source(data_cfg, split), phases))
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


# ================================================================================================ rng, outputs
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


def eval_out_dir(config, out_dir):
    """Where `evaluate` writes its per-sample CSV: the caller's `out_dir`, else `config.eval_dir` ('' = nowhere;
    optional: configs of runs saved before the key existed lack it)."""
    return out_dir if out_dir is not None else (get(config, "eval_dir", "") or None)
