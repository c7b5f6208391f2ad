"""Datasets on disk: the CineMA processed layout, its preparation from raw public releases, Sunnybrook, ArrayRecord.

Why: every task reads the same per-subject dict of numpy arrays, whatever the storage, so one `transform` serves the
built-in synthetic data, prepared ACDC / M&Ms / M&Ms2 and Sunnybrook:

    '<view>_ed', '<view>_es'          float32 images in [0, 1]: SAX (x, y, z), LAX (x, y)
    '<view>_ed_gt', '<view>_es_gt'    uint8 labels, same shape (0 BG, 1 RV, 2 MYO, 3 LV)
    'pid' (str) and the metadata columns (ed_frame, es_frame, lv_edv, lv_esv, lv_ef, rv_... in mL / %)

Sources are grain `RandomAccessDataSource`s (`__len__`, `__getitem__`, stable `__repr__` so Grain iterator
checkpoints can verify them) and hold only paths / small arrays, so they pickle cheaply into Grain workers.
numpy / scipy / nibabel / pydicom / grain only: nothing here imports jax or TensorFlow.
"""

from __future__ import annotations

import configparser
import contextlib
import csv
import functools
import io as _io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cinema_jax.data.io import Volume, check_array, read_dicom_series, read_nifti, write_nifti
from cinema_jax.errors import ConfigError, DataError
from cinema_jax.fileutil import atomic_dir, atomic_path

try:  # grain is a hard dependency; the fallback keeps this module importable in stripped-down environments
    from grain.sources import RandomAccessDataSource as _GrainSource
except ImportError:  # pragma: no cover
    _GrainSource = object

SAX_SPACING = (1.0, 1.0, 10.0)  # mm, CineMA SAX grid
LAX_SPACING = (1.0, 1.0)  # mm in-plane
SAX_SIZE = (192, 192)
LAX_SIZE = (256, 256)
PERCENTILES = (0.95, 99.5)
LV, MYO, RV = 3, 2, 1
LAYOUT_VIEWS = ("sax", "lax_2c", "lax_3c", "lax_4c")
METADATA_COLUMNS = ("pid", "pathology", "sex", "vendor", "centre", "age", "bmi", "n_frames", "ed_frame", "es_frame",
                    "n_slices", "spacing_x", "spacing_y", "spacing_z", "lv_edv", "lv_esv", "lv_ef", "rv_edv",
                    "rv_esv", "rv_ef")


# ======================================================================================================= preprocessing
def resample(array: np.ndarray, spacing: Sequence[float], target: Sequence[float], order: int,
             affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample the leading len(target) spatial axes of `array` to `target` spacing (mm).

    order 1 = linear (images), 0 = nearest (labels). Field-of-view edges are kept aligned (output voxel i' centre at
    input index (i' + 0.5) * t / s - 0.5, the "half-voxel origin shift" of the reference). Returns the array and the
    matching affine (None when `affine` is None). Extra trailing axes (e.g. t) are resampled independently.
    """
    nd = len(target)
    scale = np.asarray(target, np.float64) / np.asarray(spacing[:nd], np.float64)
    out_shape = tuple(max(1, int(round(n / s))) for n, s in zip(array.shape[:nd], scale))
    offset = 0.5 * scale - 0.5
    if np.allclose(scale, 1.0) and out_shape == array.shape[:nd]:
        out = array.copy()
    elif array.ndim == nd:
        out = ndimage.affine_transform(array, scale, offset=offset, output_shape=out_shape, order=order,
                                       mode="nearest")
    else:
        flat = array.reshape(array.shape[:nd] + (-1,))
        out = np.stack([ndimage.affine_transform(flat[..., k], scale, offset=offset, output_shape=out_shape,
                                                 order=order, mode="nearest") for k in range(flat.shape[-1])], -1)
        out = out.reshape(out_shape + array.shape[nd:])
    new_affine = None
    if affine is not None:
        m = np.eye(4)
        m[:nd, :nd] = np.diag(scale)
        m[:nd, 3] = offset
        new_affine = np.asarray(affine, np.float64) @ m
    return out, new_affine


def label_centre(label: np.ndarray, value: int = LV) -> np.ndarray | None:
    """In-plane (x, y) voxel centre of the bounding box of `label == value` over all slices; None if absent."""
    idx = np.nonzero(label == value)
    if len(idx[0]) == 0:
        return None
    return np.array([(idx[a].min() + idx[a].max()) / 2.0 for a in range(2)])


def crop_in_plane(array: np.ndarray, centre: Sequence[float], size: Sequence[int],
                  affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Crop axes 0 and 1 to `size` around `centre` (voxels), zero-padding outside the image.

    Returns (cropped, valid mask of the same in-plane shape, shifted affine).
    """
    starts = [int(round(c - s / 2.0)) for c, s in zip(centre, size)]
    out = np.zeros(tuple(size) + array.shape[2:], array.dtype)
    valid = np.zeros(tuple(size), bool)
    src, dst = [], []
    for a in range(2):
        lo, hi = max(starts[a], 0), min(starts[a] + size[a], array.shape[a])
        if hi <= lo:
            return out, valid, None if affine is None else _shift_affine(affine, starts)
        src.append(slice(lo, hi))
        dst.append(slice(lo - starts[a], hi - starts[a]))
    out[dst[0], dst[1]] = array[src[0], src[1]]
    valid[dst[0], dst[1]] = True
    return out, valid, None if affine is None else _shift_affine(affine, starts)


def _shift_affine(affine: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    m = np.eye(4)
    m[0, 3], m[1, 3] = starts[0], starts[1]
    return np.asarray(affine, np.float64) @ m


def normalise_intensity(image: np.ndarray, valid: np.ndarray | None = None,
                        percentiles: Sequence[float] = PERCENTILES) -> np.ndarray:
    """Clip to the [0.95, 99.5] intensity percentiles (over `valid` voxels) and scale to [0, 1] float32."""
    vals = image[valid] if valid is not None and valid.any() else image
    lo, hi = np.percentile(vals, percentiles)
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    out = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32)


def preprocess_view(images: Sequence[np.ndarray], spacing: Sequence[float], affine: np.ndarray,
                    labels: Sequence[np.ndarray | None] = (), target_spacing: Sequence[float] = SAX_SPACING,
                    size: Sequence[int] = SAX_SIZE, centre_label: np.ndarray | None = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray, dict]:
    """CineMA preprocessing of one view: resample, crop around the LV centre, clip percentiles, scale to [0, 1].

    images/labels: (x, y, z) arrays on the same grid (e.g. ED and ES); `centre_label` (default: the first label) gives
    the LV bounding-box centre at ED, or the image centre when it has no LV. LAX passes 2-element target spacing so z
    is left alone. Returns (images float32 in [0, 1], labels uint8, affine, info with `centre` and `spacing`).
    """
    target = tuple(target_spacing)
    res_imgs, res_labs, new_aff = [], [], affine
    for img in images:
        r, new_aff = resample(np.asarray(img, np.float32), spacing, target, 1, affine)
        res_imgs.append(r)
    for lab in labels:
        res_labs.append(None if lab is None else resample(np.asarray(lab, np.uint8), spacing, target, 0)[0])
    ref = centre_label if centre_label is not None else (labels[0] if len(labels) else None)
    centre = None
    if ref is not None:
        ref_res = resample(np.asarray(ref, np.uint8), spacing, target, 0)[0]
        centre = label_centre(ref_res, LV)
    if centre is None:
        centre = np.array(res_imgs[0].shape[:2], np.float64) / 2.0 - 0.5
    out_imgs, out_labs, out_aff = [], [], new_aff
    for r in res_imgs:
        c, valid, out_aff = crop_in_plane(r, centre, size, new_aff)
        valid_full = np.broadcast_to(valid.reshape(valid.shape + (1,) * (c.ndim - 2)), c.shape)
        out_imgs.append(np.where(valid_full, normalise_intensity(c, valid_full), 0.0).astype(np.float32))
    for r in res_labs:
        out_labs.append(None if r is None else crop_in_plane(r, centre, size)[0].astype(np.uint8))
    spacing_out = tuple(target) + tuple(spacing[len(target):3])
    return out_imgs, out_labs, out_aff, {"centre": centre, "spacing": spacing_out}


def label_volumes_ml(label: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """LV / RV cavity and MYO volumes (mL) by COUNTING label voxels x voxel volume (not summing label values)."""
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    counts = np.bincount(np.asarray(label, np.int64).ravel(), minlength=4)
    return {"lv": counts[LV] * voxel_ml, "rv": counts[RV] * voxel_ml, "myo": counts[MYO] * voxel_ml}


def ejection_fraction(edv: float, esv: float) -> float:
    """EF in % ((EDV - ESV) / EDV); NaN when EDV is 0."""
    return float(100.0 * (edv - esv) / edv) if edv > 0 else float("nan")


# ============================================================================================== CineMA processed layout
def _parse_column(values: list[str]):
    """Infer one type per metadata column (int, float or str) so samples batch consistently."""
    filled = [v for v in values if v != ""]
    try:
        ints = [int(v) for v in filled]
        return [np.int64(i) for i in _fill(values, ints, -1)]
    except ValueError:
        pass
    try:
        floats = [float(v) for v in filled]
        return [np.float32(f) for f in _fill(values, floats, np.nan)]
    except ValueError:
        return list(values)


def _fill(values: list[str], parsed: list, missing) -> list:
    it = iter(parsed)
    return [next(it) if v != "" else missing for v in values]


def read_metadata_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a `<split>_metadata.csv` as dicts with typed values (ints, float32, str; blanks -> -1 / NaN / '')."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata CSV not found")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read metadata CSV ({err})") from None
    if not rows or "pid" not in rows[0]:
        raise DataError(f"{path}: metadata CSV has no rows or no 'pid' column")
    columns = {k: _parse_column([(r.get(k) or "").strip() for r in rows]) for k in rows[0]}
    columns["pid"] = [(r.get("pid") or "").strip() for r in rows]
    return [{k: columns[k][i] for k in columns} for i in range(len(rows))]


class CinemaLayoutSource(_GrainSource):
    """Grain source over `<root>/<split>/<pid>/<pid>_<view>_{ed,es}[_gt].nii.gz` + `<root>/<split>_metadata.csv`.

    Each item: '<view>_ed' / '<view>_es' float32 in [0, 1] (uint8 files, as the reference stores them, are divided by
    255), '<view>_ed_gt' / '<view>_es_gt' uint8 when `with_labels`, '<view>_spacing' float32 (mm), 'pid' and the
    metadata columns. SAX arrays are (x, y, z); LAX files stored (x, y, 1) are returned (x, y). `cine`: also
    '<view>_t' from `<pid>_<view>_t.nii.gz`, SAX (x, y, z, t), LAX (x, y, t); `edes=False` skips the ED/ES files
    (a pretraining layout may hold only the cine, as the reference's UK Biobank files do).
    """

    def __init__(self, root: str | os.PathLike, split: str, views: Sequence[str] = ("sax",),
                 with_labels: bool = True, cine: bool = False, edes: bool = True):
        self.root = Path(root)
        self.split = split
        self.views = tuple(views)
        self.with_labels = bool(with_labels) and bool(edes)
        self.cine, self.edes = bool(cine), bool(edes)
        bad = [v for v in self.views if v not in LAYOUT_VIEWS]
        if bad:
            raise ConfigError(f"unknown view(s) {bad}; views are {LAYOUT_VIEWS}")
        if not (self.cine or self.edes):
            raise ConfigError("CinemaLayoutSource needs cine=True or edes=True (nothing to read otherwise)")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root not found")
        self._rows = read_metadata_csv(self.root / f"{split}_metadata.csv")

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        extra = (", cine=True" if self.cine else "") + ("" if self.edes else ", edes=False")
        return (f"CinemaLayoutSource(root={str(self.root)!r}, split={self.split!r}, views={self.views!r}, "
                f"with_labels={self.with_labels}{extra}, n={len(self)})")

    def path(self, index: int, view: str, phase: str, label: bool = False) -> Path:
        pid = self._rows[index]["pid"]
        return self.root / self.split / pid / f"{pid}_{view}_{phase}{'_gt' if label else ''}.nii.gz"

    def _image(self, path: Path, view: str, cine: bool) -> Volume:
        ndim = ((4,) if view == "sax" else (3, 4)) if cine else ((3,) if view == "sax" else (2, 3))
        vol = read_nifti(path, ndim=ndim, dtype=np.float32)
        img = vol.array
        if _on_disk_dtype(path) == np.uint8:
            img = img / 255.0
        if view != "sax" and img.ndim == (4 if cine else 3):
            img = _squeeze_lax(img, path)
        return Volume(img.astype(np.float32), vol.spacing, vol.affine, vol.meta)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} subjects")
        row = self._rows[index]
        out: dict[str, Any] = dict(row)
        for view in self.views:
            spatial = 3 if view == "sax" else 2
            for phase in ("ed", "es") if self.edes else ():
                vol = self._image(self.path(index, view, phase), view, cine=False)
                out[f"{view}_{phase}"] = vol.array
                out[f"{view}_spacing"] = np.asarray(vol.spacing[:spatial], np.float32)
                if self.with_labels:
                    lpath = self.path(index, view, phase, label=True)
                    lab = read_nifti(lpath, ndim=(3,) if view == "sax" else (2, 3), dtype=np.uint8).array
                    if view != "sax" and lab.ndim == 3:
                        lab = _squeeze_lax(lab, lpath)
                    if lab.shape != vol.array.shape:
                        raise DataError(f"{lpath}: label shape {lab.shape} differs from image shape "
                                        f"{vol.array.shape}")
                    out[f"{view}_{phase}_gt"] = lab
            if self.cine:
                vol = self._image(self.path(index, view, "t"), view, cine=True)
                out[f"{view}_t"] = vol.array
                out.setdefault(f"{view}_spacing", np.asarray(vol.spacing[:spatial], np.float32))
        return out


def _squeeze_lax(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.shape[2] != 1:
        kind = "(x, y, t) or (x, y, 1, t)" if arr.ndim == 4 else "(x, y) or (x, y, 1)"
        raise DataError(f"{path}: LAX image must be {kind}, got {arr.shape}")
    return arr[:, :, 0]


def _on_disk_dtype(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path)).get_data_dtype()
    except Exception:  # already validated by read_nifti; any failure here means "not uint8"
        return np.float32


# ========================================================================================== raw releases -> layout
@dataclass
class RawSubject:
    """One subject of a raw release: ED/ES Volumes per view (labels already in ACDC order) and metadata."""

    pid: str
    split: str
    views: dict[str, dict[str, Volume | None]]  # view -> {'ed', 'es', 'ed_gt', 'es_gt'}
    meta: dict[str, Any] = field(default_factory=dict)


def _map_labels(arr: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    arr = np.asarray(arr, np.uint8)
    if not mapping:
        return arr
    lut = np.arange(256, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[arr]


def _frame(vol: Volume, t: int, path) -> Volume:
    if vol.array.ndim != 4:
        raise DataError(f"{path}: expected a 4-D cine (x, y, z, t), got shape {vol.array.shape}")
    if not 0 <= t < vol.array.shape[3]:
        raise DataError(f"{path}: frame {t} out of range for {vol.array.shape[3]} frames")
    return Volume(np.ascontiguousarray(vol.array[..., t]), vol.spacing, vol.affine, vol.meta)


def _bmi(height_cm, weight_kg) -> float:
    try:
        h, w = float(height_cm), float(weight_kg)
    except (TypeError, ValueError):
        return float("nan")
    return w / (h / 100.0) ** 2 if h > 0 else float("nan")


def _acdc_subjects(raw_dir: Path, val_fraction: float) -> Iterator[RawSubject]:
    """ACDC: `[database/]{training,testing}/patientNNN/{Info.cfg, patientNNN_frameNN[_gt].nii.gz}`."""
    dirs = sorted(p.parent for p in raw_dir.rglob("Info.cfg") if re.fullmatch(r"patient\d+", p.parent.name))
    if not dirs:
        raise DataError(f"{raw_dir}: no ACDC patientNNN/Info.cfg found (expected database/training/patient001/...)")
    train = [d for d in dirs if d.parent.name.lower() != "testing"]
    n_val = int(round(len(train) * val_fraction))
    val = set(train[len(train) - n_val:]) if n_val else set()  # last pids of training: deterministic
    for d in dirs:
        cfg = _read_info_cfg(d / "Info.cfg")
        split = "test" if d.parent.name.lower() == "testing" else ("val" if d in val else "train")
        pid = d.name
        try:
            ed, es = int(cfg["ED"]), int(cfg["ES"])
        except (KeyError, ValueError):
            raise DataError(f"{d / 'Info.cfg'}: needs integer ED and ES entries") from None
        if min(ed, es) < 1:  # ACDC numbers frames from 1; 0 would become ed_frame -1 in the metadata
            raise DataError(f"{d / 'Info.cfg'}: ED {ed} / ES {es} must be >= 1 (ACDC frames are 1-based)")
        vols = {}
        for phase, frame in (("ed", ed), ("es", es)):
            stem = d / f"{pid}_frame{frame:02d}"
            vols[phase] = read_nifti(f"{stem}.nii.gz", ndim=3)
            gt = Path(f"{stem}_gt.nii.gz")
            vols[f"{phase}_gt"] = read_nifti(gt, ndim=3, dtype=np.uint8) if gt.exists() else None
        meta = {"pathology": cfg.get("Group", ""), "n_frames": cfg.get("NbFrame", ""),
                "ed_frame": ed - 1, "es_frame": es - 1,  # ACDC frames are 1-based; metadata is 0-based
                "bmi": _bmi(cfg.get("Height"), cfg.get("Weight"))}
        yield RawSubject(pid, split, {"sax": vols}, meta)


def _read_info_cfg(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string("[info]\n" + path.read_text())
    except (configparser.Error, UnicodeDecodeError) as err:  # configparser's messages span lines: join them
        raise DataError(f"{path}: cannot parse ({' '.join(str(err).split())})") from None
    names = {"ed": "ED", "es": "ES", "nbframe": "NbFrame"}  # configparser lower-cases keys
    return {names.get(k, k.capitalize()): v.strip() for k, v in parser["info"].items()}


def _find_csv(raw_dir: Path, required: str, name_hint: str) -> list[dict[str, str]]:
    for p in sorted(raw_dir.rglob("*.csv")):
        try:
            with open(p, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        if rows and required in rows[0]:
            return rows
    raise DataError(f"{raw_dir}: no {name_hint} CSV with a {required!r} column found")


# M&Ms and M&Ms-2 label 1 LV, 2 MYO, 3 RV; ACDC order is 1 RV, 2 MYO, 3 LV.
_MNMS_LABELS = {1: LV, 2: MYO, 3: RV}


def _mnms_subjects(raw_dir: Path, val_fraction: float) -> Iterator[RawSubject]:
    """M&Ms: `{Training/Labeled,Validation,Testing}/<id>/<id>_sa[_gt].nii.gz` (4-D) + info CSV (ED/ES 0-based)."""
    info = {r["External code"].strip(): r for r in _find_csv(raw_dir, "External code", "M&Ms information")}
    images = sorted(raw_dir.rglob("*_sa.nii.gz"))
    if not images:
        raise DataError(f"{raw_dir}: no M&Ms <id>/<id>_sa.nii.gz images found")
    for img_path in images:
        pid = img_path.name[: -len("_sa.nii.gz")]
        parts = [p.lower() for p in img_path.parts]
        split = "test" if "testing" in parts else "val" if "validation" in parts else "train"
        if "unlabeled" in parts:
            continue
        row = info.get(pid)
        if row is None:
            raise DataError(f"{img_path}: subject {pid} missing from the M&Ms information CSV")
        try:
            ed, es = int(row["ED"]), int(row["ES"])
        except (KeyError, ValueError):
            raise DataError(f"{img_path}: information CSV has no integer ED/ES for {pid}") from None
        cine = read_nifti(img_path, ndim=4)
        gt_path = img_path.with_name(f"{pid}_sa_gt.nii.gz")
        gt = read_nifti(gt_path, ndim=4, dtype=np.uint8) if gt_path.exists() else None
        vols: dict[str, Volume | None] = {"ed": _frame(cine, ed, img_path), "es": _frame(cine, es, img_path)}
        for phase, t in (("ed", ed), ("es", es)):
            if gt is None:
                vols[f"{phase}_gt"] = None
            else:
                g = _frame(gt, t, gt_path)
                vols[f"{phase}_gt"] = Volume(_map_labels(g.array, _MNMS_LABELS), g.spacing, g.affine, g.meta)
        meta = {"pathology": row.get("Pathology", ""), "vendor": row.get("VendorName", row.get("Vendor", "")),
                "centre": row.get("Centre", ""), "sex": row.get("Sex", ""), "age": row.get("Age", ""),
                "bmi": _bmi(row.get("Height"), row.get("Weight")), "n_frames": cine.array.shape[3],
                "ed_frame": ed, "es_frame": es}
        yield RawSubject(pid, split, {"sax": vols}, meta)


def _mnms2_split(pid: str) -> str:
    n = int(pid) if pid.isdigit() else 0
    return "train" if n <= 160 else "val" if n <= 200 else "test"


def _mnms2_subjects(raw_dir: Path, val_fraction: float) -> Iterator[RawSubject]:
    """M&Ms-2: `dataset/<NNN>/<NNN>_{SA,LA}_{ED,ES}[_gt].nii.gz` + `dataset_information.csv` (001-160 train,
    161-200 val, 201-360 test). LA is the 4-chamber view."""
    try:
        info = {r["SUBJECT_CODE"].strip().zfill(3): r
                for r in _find_csv(raw_dir, "SUBJECT_CODE", "M&Ms-2 dataset_information")}
    except DataError:
        info = {}
    images = sorted(raw_dir.rglob("*_SA_ED.nii.gz"))
    if not images:
        raise DataError(f"{raw_dir}: no M&Ms-2 <NNN>/<NNN>_SA_ED.nii.gz images found")
    for ed_path in images:
        pid = ed_path.name[: -len("_SA_ED.nii.gz")]
        d = ed_path.parent
        views = {}
        for view, tag, ndim in (("sax", "SA", 3), ("lax_4c", "LA", (2, 3))):
            if not (d / f"{pid}_{tag}_ED.nii.gz").exists():
                continue
            vols: dict[str, Volume | None] = {}
            for phase in ("ed", "es"):
                p = d / f"{pid}_{tag}_{phase.upper()}.nii.gz"
                vol = read_nifti(p, ndim=ndim)
                vols[phase] = _as_3d(vol)
                gt = d / f"{pid}_{tag}_{phase.upper()}_gt.nii.gz"
                if gt.exists():
                    g = _as_3d(read_nifti(gt, ndim=ndim, dtype=np.uint8))
                    vols[f"{phase}_gt"] = Volume(_map_labels(g.array, _MNMS_LABELS), g.spacing, g.affine, g.meta)
                else:
                    vols[f"{phase}_gt"] = None
            views[view] = vols
        row = info.get(pid.zfill(3), {})
        meta = {"pathology": row.get("DISEASE", ""), "sex": row.get("SEX", ""), "age": row.get("AGE", ""),
                "vendor": row.get("VENDOR", row.get("SCANNER", "")), "n_frames": "", "ed_frame": "",
                "es_frame": ""}
        yield RawSubject(pid, _mnms2_split(pid), views, meta)


def _as_3d(vol: Volume) -> Volume:
    if vol.array.ndim == 2:
        return Volume(vol.array[:, :, None], tuple(vol.spacing) + (1.0,), vol.affine, vol.meta)
    return vol


_RAW_READERS = {"acdc": _acdc_subjects, "mnms": _mnms_subjects, "mnms2": _mnms2_subjects}


def _process_subject(sub: RawSubject, out_dir: Path) -> dict[str, Any]:
    """Preprocess and write one subject's views; returns its metadata row."""
    row: dict[str, Any] = {"pid": sub.pid, **sub.meta}
    subj_dir = out_dir / sub.split / sub.pid
    for view, vols in sub.views.items():
        ed, es = vols["ed"], vols["es"]
        if ed.array.shape != es.array.shape:
            raise DataError(f"{sub.pid} {view}: ED shape {ed.array.shape} differs from ES shape {es.array.shape}")
        labels = [vols.get("ed_gt"), vols.get("es_gt")]
        has_labels = all(lab is not None for lab in labels)
        lab_arrays = [lab.array for lab in labels] if has_labels else []
        for phase, lab_vol, lab in zip(("ed", "es"), labels, lab_arrays):
            if lab.shape != ed.array.shape:
                raise DataError(f"{sub.pid} {view}: label shape {lab.shape} differs from image {ed.array.shape}")
            bad = np.setdiff1d(np.unique(lab), np.arange(LV + 1))
            if bad.size:  # other values would silently count as no class (wrong volumes / EF)
                where = lab_vol.meta.get("path", f"{sub.pid} {view} {phase} label")
                raise DataError(f"{where}: label values {bad.tolist()} outside 0-3 (BG, RV, MYO, LV)")
        sax = view == "sax"
        target = SAX_SPACING if sax else LAX_SPACING
        size = SAX_SIZE if sax else LAX_SIZE
        imgs, labs, aff, info = preprocess_view([ed.array, es.array], ed.spacing, ed.affine, lab_arrays,
                                                target, size)
        for phase, img in zip(("ed", "es"), imgs):
            write_nifti(subj_dir / f"{sub.pid}_{view}_{phase}.nii.gz", img, affine=aff)
        for phase, lab in zip(("ed", "es"), labs):
            write_nifti(subj_dir / f"{sub.pid}_{view}_{phase}_gt.nii.gz", lab, affine=aff)
        if sax:
            row["n_slices"] = imgs[0].shape[2]
            row["spacing_x"], row["spacing_y"], row["spacing_z"] = (float(s) for s in ed.spacing[:3])
            if has_labels:
                v_ed = label_volumes_ml(lab_arrays[0], ed.spacing)
                v_es = label_volumes_ml(lab_arrays[1], ed.spacing)
                for k in ("lv", "rv"):
                    row[f"{k}_edv"], row[f"{k}_esv"] = v_ed[k], v_es[k]
                    row[f"{k}_ef"] = ejection_fraction(v_ed[k], v_es[k])
    return row


def _format_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.4f}".rstrip("0").rstrip(".")
    return str(v).strip()


def write_metadata_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write metadata rows; columns in METADATA_COLUMNS order (those any row has), extras after."""
    present = {k for r in rows for k in r}
    cols = [c for c in METADATA_COLUMNS if c in present] + sorted(present - set(METADATA_COLUMNS))
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _format_cell(r.get(c)) for c in cols})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def prepare(dataset: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike, val_fraction: float = 0.1,
            overwrite: bool = False) -> dict[str, int]:
    """Raw public release (`acdc`, `mnms`, `mnms2`) -> CineMA processed layout in `out_dir`.

    SAX resampled to 1 x 1 x 10 mm (linear image, nearest label), LAX to 1 mm in-plane; cropped 192 x 192 (SAX) /
    256 x 256 (LAX) around the ED LV bounding-box centre; intensities clipped to the [0.95, 99.5] percentiles and
    scaled to [0, 1] (float32); labels in ACDC order. Metadata volumes (mL) count label voxels on the original grid.
    ACDC has no validation split: the last `val_fraction` of training pids become `val`. Everything is written into
    a temporary directory renamed onto `out_dir` at the end, so a failure leaves nothing half-written.
    Returns subjects per split.
    """
    name = dataset.lower()
    if name not in _RAW_READERS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {sorted(_RAW_READERS)}")
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise DataError(f"{raw}: raw dataset directory not found")
    rows: dict[str, list] = {}
    with atomic_dir(out_dir, overwrite=overwrite, sources=(raw,), kind="dataset") as tmp:
        for sub in _RAW_READERS[name](raw, val_fraction):
            rows.setdefault(sub.split, []).append(_process_subject(sub, tmp))
        for split, split_rows in rows.items():
            write_metadata_csv(tmp / f"{split}_metadata.csv", split_rows)
        info = {"dataset": name, "raw_dir": str(raw.resolve()), "subjects": {k: len(v) for k, v in rows.items()},
                "sax_spacing_mm": SAX_SPACING, "lax_spacing_mm": LAX_SPACING, "percentiles": PERCENTILES}
        (tmp / "prepare_info.json").write_text(json.dumps(info, indent=1))
    return {k: len(v) for k, v in rows.items()}


# ====================================================================================================== Sunnybrook
@dataclass
class SunnybrookSubject:
    """One Sunnybrook SAX cine with its expert contours rasterised to ACDC-ordered labels.

    image: Volume (x, y, z, t), raw scanner intensities; ed_label / es_label: uint8 (x, y, z) with 3 LV cavity
    (inside endocardium) and 2 MYO (between epicardium and endocardium; epicardia exist at ED only, so ES has LV only);
    annotated_slices: slices with endocardial contours at both ED and ES (the ones volumes and EF use).
    spacing: (x, y, z) mm with z the step between slice positions.
    """

    pid: str
    image: Volume
    ed_frame: int
    es_frame: int
    ed_label: np.ndarray
    es_label: np.ndarray
    annotated_slices: tuple[int, ...]
    spacing: tuple[float, float, float]
    contours: dict = field(default_factory=dict, repr=False)  # (kind 'i'/'o', z, t) -> (n, 2) x, y pixel coords

    def frame(self, phase: str) -> np.ndarray:
        """(x, y, z) float32 image at 'ed' or 'es'."""
        return self.image.array[..., self.ed_frame if phase == "ed" else self.es_frame]

    def lv_volumes(self) -> dict[str, float]:
        """LV EDV / ESV (mL, label-voxel counts x voxel volume over the annotated slices) and EF (%)."""
        zs = list(self.annotated_slices)
        edv = label_volumes_ml(self.ed_label[:, :, zs], self.spacing)["lv"]
        esv = label_volumes_ml(self.es_label[:, :, zs], self.spacing)["lv"]
        return {"lv_edv": edv, "lv_esv": esv, "lv_ef": ejection_fraction(edv, esv)}


_CONTOUR_RE = re.compile(r"IM-\d+-(\d+)-([io])contour-manual\.txt$")


def read_contour(path: str | os.PathLike) -> np.ndarray:
    """(n, 2) float64 x (column), y (row) pixel coordinates of a Sunnybrook contour text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: contour file not found")
    try:
        pts = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse contour ({err})") from None
    if pts.shape[1] != 2 or pts.shape[0] < 3:
        raise DataError(f"{path}: contour needs >= 3 'x y' lines, got shape {pts.shape}")
    return check_array(pts, "contour", ndim=2, path=path)


def polygon_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (x, y) mask of pixel centres inside the closed polygon `points` (n, 2) given as (x, y) pixel coords.

    Even-odd crossing rule, evaluated on the polygon's bounding box only.
    """
    mask = np.zeros(shape, bool)
    x0 = max(int(np.floor(points[:, 0].min())), 0)
    x1 = min(int(np.ceil(points[:, 0].max())) + 1, shape[0])
    y0 = max(int(np.floor(points[:, 1].min())), 0)
    y1 = min(int(np.ceil(points[:, 1].max())) + 1, shape[1])
    if x1 <= x0 or y1 <= y0:
        return mask
    gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64), indexing="ij")
    inside = np.zeros(gx.shape, bool)
    xa, ya = points[:, 0], points[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    for i in range(len(xa)):
        if ya[i] == yb[i]:
            continue
        crosses = (ya[i] > gy) != (yb[i] > gy)
        x_at = xa[i] + (gy - ya[i]) * (xb[i] - xa[i]) / (yb[i] - ya[i])
        inside ^= crosses & (gx < x_at)
    mask[x0:x1, y0:y1] = inside
    return mask


def _sunnybrook_subject(folder: Path) -> SunnybrookSubject:
    vol = read_dicom_series(folder / "dicom")
    where = {}
    for z, row in enumerate(vol.meta["files"]):
        for t, f in enumerate(row):
            stem = Path(f).stem
            if stem.isdigit():
                where[int(stem)] = (z, t)
    contours = {}
    cdir = folder / "contours"
    files = sorted(cdir.rglob("*contour-manual.txt")) if cdir.is_dir() else []
    if not files:
        raise DataError(f"{cdir}: no Sunnybrook contour files (IM-0001-NNNN-[io]contour-manual.txt)")
    for f in files:
        m = _CONTOUR_RE.search(f.name)
        if m is None:
            continue
        num, kind = int(m.group(1)), m.group(2)
        if num not in where:
            raise DataError(f"{f}: refers to image {num}.dcm, which is not in {folder / 'dicom'}")
        z, t = where[num]
        contours[(kind, z, t)] = read_contour(f)
    shape = vol.array.shape[:2]
    for (kind, z, t), c in contours.items():  # off the grid: an empty mask would be taught as background
        if (c < -1).any() or (c[:, 0] > shape[0]).any() or (c[:, 1] > shape[1]).any():
            raise DataError(f"{cdir}: {'endo' if kind == 'i' else 'epi'}cardial contour at slice {z}, frame {t} has "
                            f"points outside the {shape[0]}x{shape[1]} image")
    endo = {(z, t): polygon_mask(c, shape) for (k, z, t), c in contours.items() if k == "i"}
    frames = sorted({t for (_, t) in endo}, key=lambda t: -sum(1 for (_, tt) in endo if tt == t))[:2]
    if len(frames) < 2:
        raise DataError(f"{folder}: endocardial contours found at fewer than two frames ({frames})")
    both = sorted({z for (z, t) in endo if t == frames[0]} & {z for (z, t) in endo if t == frames[1]})
    if not both:
        raise DataError(f"{folder}: no slice has endocardial contours at both frames {frames}")
    area = {t: sum(endo[(z, t)].sum() for z in both) for t in frames}
    ed, es = (frames[0], frames[1]) if area[frames[0]] >= area[frames[1]] else (frames[1], frames[0])
    nz = vol.array.shape[2]
    labels = {}
    for t in (ed, es):
        lab = np.zeros(shape + (nz,), np.uint8)
        for z in range(nz):
            if ("o", z, t) in contours:
                lab[:, :, z][polygon_mask(contours[("o", z, t)], shape)] = MYO
            if (z, t) in endo:
                lab[:, :, z][endo[(z, t)]] = LV
        labels[t] = lab
    return SunnybrookSubject(pid=folder.name, image=vol, ed_frame=ed, es_frame=es, ed_label=labels[ed],
                             es_label=labels[es], annotated_slices=tuple(int(z) for z in both),
                             spacing=tuple(float(s) for s in vol.spacing), contours=contours)


def load_sunnybrook(root: str | os.PathLike, subjects: Sequence[str] | None = None) -> list[SunnybrookSubject]:
    """Load Sunnybrook subjects (`<root>/<subject>/{dicom,contours}`) sorted by name; `subjects` picks some."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: Sunnybrook directory not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / "dicom").is_dir())
    if subjects is not None:
        want = set(subjects)
        missing = want - {p.name for p in folders}
        if missing:
            raise DataError(f"{root}: Sunnybrook subject(s) not found: {sorted(missing)}")
        folders = [p for p in folders if p.name in want]
    if not folders:
        raise DataError(f"{root}: no Sunnybrook subject folders with a dicom/ subfolder")
    return [_sunnybrook_subject(p) for p in folders]


class SunnybrookSource(_GrainSource):
    """Grain source of Sunnybrook (image, mask) samples at ED and ES for fine-tuning / evaluation.

    mode 'volume': one item per (subject, phase): 'sax' float32 (x, y, z) in [0, 1], 'sax_gt' uint8 (x, y, z),
    'annotated' bool (z,) marking slices with contours (train/evaluate only on those), 'sax_spacing' (3,) mm.
    mode 'slice': one item per annotated (subject, phase, slice): 'sax' (x, y), 'sax_gt' (x, y).
    `preprocess=True` applies the CineMA SAX preprocessing (1 x 1 x 10 mm, 192 x 192 around the LV); otherwise the
    native grid is kept and intensities are percentile-clipped to [0, 1]. Every item has 'pid', 'phase', 'frame'.
    """

    def __init__(self, root: str | os.PathLike, mode: str = "volume", preprocess: bool = False,
                 subjects: Sequence[str] | None = None):
        if mode not in ("volume", "slice"):
            raise ConfigError(f"SunnybrookSource mode must be 'volume' or 'slice', got {mode!r}")
        self.root, self.mode, self.preprocess = Path(root), mode, bool(preprocess)
        self.subjects = None if subjects is None else tuple(subjects)
        self._items: list[dict[str, Any]] = []
        for sub in load_sunnybrook(self.root, self.subjects):
            annotated = np.zeros(sub.image.array.shape[2], bool)
            annotated[list(sub.annotated_slices)] = True
            for phase, t, lab in (("ed", sub.ed_frame, sub.ed_label), ("es", sub.es_frame, sub.es_label)):
                img, spacing = sub.frame(phase), sub.spacing
                if self.preprocess:
                    imgs, labs, _, info = preprocess_view([img], spacing, sub.image.affine, [lab, annotated_to_3d(
                        annotated, lab.shape)], SAX_SPACING, SAX_SIZE, centre_label=sub.ed_label)
                    img, lab, spacing = imgs[0], labs[0], info["spacing"]
                    ann = labs[1].any(axis=(0, 1)) if labs[1].size else np.zeros(img.shape[2], bool)
                else:
                    img, ann = normalise_intensity(img), annotated
                base = {"pid": sub.pid, "phase": phase, "frame": np.int64(t),
                        "sax_spacing": np.asarray(spacing, np.float32)}
                if mode == "volume":
                    self._items.append({**base, "sax": img, "sax_gt": lab.astype(np.uint8), "annotated": ann})
                else:
                    for z in np.nonzero(ann)[0]:
                        self._items.append({**base, "slice": np.int64(z), "sax": img[:, :, z],
                                            "sax_gt": lab[:, :, z].astype(np.uint8)})

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._items[int(index)].items()}

    def __repr__(self) -> str:
        return (f"SunnybrookSource(root={str(self.root)!r}, mode={self.mode!r}, preprocess={self.preprocess}, "
                f"subjects={self.subjects!r}, n={len(self)})")


def annotated_to_3d(annotated: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a (z,) slice flag to a uint8 (x, y, z) volume (so it can be resampled like a label)."""
    return np.broadcast_to(annotated.astype(np.uint8)[None, None, :], shape).copy()


# ====================================================================================================== ArrayRecord
_U8 = "::u8"  # key suffix marking a float array in [0, 1] stored quantised to uint8
_SEP = "/"  # nested dict keys are flattened with this separator
_FRAME = "@t"  # '<key>@t00012': frame 12 of a cine array stored one frame per member ('<key>@shape': its shape)
_SHAPE = "@shape"
_FRAMES_AT = "@frames"  # in a record whose frames live in the companion file: index of its frame 0 there
_FRAMES_U8 = "@frames_u8"  # ... and the names of its quantised cine keys
ARRAYRECORD_OPTIONS = "group_size:1,uncompressed"  # members are zlib'd in the npz: a frame decodes on its own
# A frame record (frame t of every view) is read whole, so ArrayRecord's zstd compresses it and its npz members are
# stored raw: the same size as zlib'd members, decoded 2.7x faster (1.4 vs 3.8 ms for a paper-size frame; notes/perf.md)
FRAME_RECORD_OPTIONS = "group_size:1,zstd:1"


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in record.items():
        if _SEP in k or _U8 in k or "@" in k:
            raise ValueError(f"record key {k!r} must not contain {_SEP!r}, {_U8!r} or '@'")
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}{_SEP}")
        else:
            yield f"{prefix}{k}", v


def _quantise(arr: np.ndarray) -> np.ndarray:
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _npz_bytes(arrays: Mapping[str, np.ndarray], compress: bool = True) -> bytes:
    buf = _io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


def _split_record(record: Mapping[str, Any], quantize: Iterable[str], frames: Iterable[str]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(npz members of the record, {frame key + suffix: cine array}) with quantisation applied."""
    quantize, frames = set(quantize), set(frames)
    arrays, cines = {}, {}
    for key, value in _flatten(record):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ValueError(f"record field {key!r} is not an array, number or string ({type(value).__name__})")
        suffix = _U8 if key in quantize else ""
        if key in frames:
            if arr.ndim < 2:
                raise ValueError(f"record field {key!r} has shape {arr.shape}; frames are stored along a last axis")
            arrays[key + _SHAPE] = np.asarray(arr.shape, np.int64)
            cines[key + suffix] = _quantise(arr) if suffix else arr
        else:
            arrays[key + suffix] = _quantise(arr) if suffix else arr
    return arrays, cines


def encode_record(record: Mapping[str, Any], quantize: Iterable[str] = (), frames: Iterable[str] = ()) -> bytes:
    """Serialise a (nested) dict of arrays / scalars / strings to npz bytes, each member zlib'd (no pickle).

    Keys in `quantize` (float arrays in [0, 1], e.g. images) are stored as uint8 (x 255) and decoded back to float32.
    Keys in `frames` (cine arrays, time last) are stored one member per frame, so a reader that wants one frame of
    the cycle decompresses that frame only (`decode_record` returns them as `FrameStack`s).
    """
    arrays, cines = _split_record(record, quantize, frames)
    for key, arr in cines.items():
        base, suffix = (key[: -len(_U8)], _U8) if key.endswith(_U8) else (key, "")
        for t in range(arr.shape[-1]):
            arrays[f"{base}{_FRAME}{t:05d}{suffix}"] = arr[..., t]
    return _npz_bytes(arrays)


class FrameStack:
    """A cine array (time last) decoded frame by frame: `frame(t)` reads and decompresses frame t only.

    `fetch(t)` returns the stored frame (uint8 when quantised). `np.asarray(stack)` gives the whole array; `shape`
    and `ndim` need no decoding. Pickles as the plain array.
    """

    def __init__(self, key: str, shape: Sequence[int], quantised: bool, fetch, where: str):
        self._key, self._q, self._fetch, self._where = key, quantised, fetch, where
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self._q else self.frame(0).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def frame(self, t: int) -> np.ndarray:
        t = int(t)
        if not -self.shape[-1] <= t < self.shape[-1]:
            raise IndexError(f"frame {t} out of range for {self.shape[-1]} frames of {self._key!r}")
        t %= self.shape[-1]
        try:
            arr = self._fetch(t)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{self._where}: cannot decode frame {t} of {self._key!r} ({type(err).__name__}: "
                            f"{err})") from None
        if arr.shape != self.shape[:-1]:
            raise DataError(f"{self._where}: frame {t} of {self._key!r} has shape {arr.shape}, expected "
                            f"{self.shape[:-1]}")
        return arr.astype(np.float32) / np.float32(255.0) if self._q else arr

    def __array__(self, dtype=None, copy=None):
        out = np.stack([self.frame(t) for t in range(self.shape[-1])], axis=-1)
        return out if dtype is None else out.astype(dtype)

    def __reduce__(self):
        return (np.asarray, (np.asarray(self),))

    def __repr__(self) -> str:
        return f"FrameStack({self._key!r}, shape={self.shape}, quantised={self._q})"


def frame_of(array, t: int) -> np.ndarray:
    """Frame t (last axis) of a cine array or `FrameStack`, decoding only that frame."""
    return array.frame(t) if isinstance(array, FrameStack) else np.asarray(array)[..., int(t)]


class _FrameRecords:
    """Frame records of one subject in a companion file, the last one read kept open (all views share a frame)."""

    def __init__(self, read, first: int, where: str):
        self._read, self._first, self._where = read, int(first), where
        self._t, self._npz = None, None

    def member(self, name: str, t: int) -> np.ndarray:
        if self._t != t:
            if self._read is None:
                raise DataError(f"{self._where}: its frames live in a companion '.frames.array_record' file that "
                                "was not opened (read it through ArrayRecordSource)")
            self._npz = np.load(_io.BytesIO(self._read(self._first + t)), allow_pickle=False)
            self._t = t
        return self._npz[name]


def _inline_frame(npz, prefix: str, suffix: str, t: int) -> np.ndarray:
    return npz[f"{prefix}{t:05d}{suffix}"]


def decode_record(data: bytes, where: str = "record", read_frame_record=None) -> dict[str, Any]:
    """Inverse of `encode_record`: 0-d numbers come back as numpy scalars, strings as str, nested dicts rebuilt,
    per-frame cine arrays as `FrameStack`s (decoded on access). `read_frame_record(i)` returns record i of the
    companion frames file, for records written with `write_arrayrecord(..., frame_records=True)`."""
    try:
        npz = np.load(_io.BytesIO(data), allow_pickle=False)
        names = list(npz.files)
        stacks = {n[: -len(_SHAPE)]: npz[n] for n in names if n.endswith(_SHAPE)}
        flat = {k: npz[k] for k in names if _FRAME not in k and not k.endswith(_SHAPE) and not k.startswith("@")}
        first = int(npz[_FRAMES_AT]) if _FRAMES_AT in names else None
        quantised_keys = set(npz[_FRAMES_U8].tolist()) if _FRAMES_U8 in names else set()
    except Exception as err:
        raise DataError(f"{where}: cannot decode record ({type(err).__name__}: {err})") from None
    records = _FrameRecords(read_frame_record, first, where) if first is not None else None
    for key, shape in stacks.items():
        if records is not None:  # frames in the companion file, one record per frame holding every cine key
            quantised = key in quantised_keys
            fetch = functools.partial(records.member, key + (_U8 if quantised else ""))
        else:  # frames inline, one member each
            quantised = f"{key}{_FRAME}00000{_U8}" in names
            if f"{key}{_FRAME}00000{_U8 if quantised else ''}" not in names and int(shape[-1]) > 0:
                raise DataError(f"{where}: cine field {key!r} has no frames")
            fetch = functools.partial(_inline_frame, npz, key + _FRAME, _U8 if quantised else "")
        flat[key] = FrameStack(key, shape, quantised, fetch, where)
    if not stacks or records is not None:
        npz.close()
    out: dict[str, Any] = {}
    for key, arr in flat.items():
        if key.endswith(_U8):
            key, arr = key[: -len(_U8)], arr.astype(np.float32) / np.float32(255.0)
        if isinstance(arr, np.ndarray) and arr.ndim == 0:
            arr = str(arr[()]) if arr.dtype.kind == "U" else arr[()]
        node = out
        *parents, leaf = key.split(_SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return out
def frames_path(path: str | os.PathLike) -> Path:
    """The companion file holding the per-frame records of `X.array_record`: `X.frames.array_record`."""
    p = Path(path)
    stem = p.name[: -len(".array_record")] if p.name.endswith(".array_record") else p.name
    return p.with_name(f"{stem}.frames.array_record")


def write_arrayrecord(path: str | os.PathLike, records: Iterable[Mapping[str, Any]], quantize: Iterable[str] = (),
                      frames: Iterable[str] = (), frame_records: bool = False) -> int:
    """Atomically write records (dicts of numpy arrays) to one ArrayRecord file; returns the count.

    group_size:1 keeps every record individually addressable for fast random access by Grain; the npz members are
    already compressed one by one, so the ArrayRecord layer does not compress again (one frame decodes alone).
    `frame_records`: the `frames` keys go to the companion file `frames_path(path)`, one record per frame holding
    frame t of every cine key, so reading one frame of a subject reads ~1/T of its bytes (pretraining draws one
    frame per subject); that file compresses each record with zstd (`FRAME_RECORD_OPTIONS`), as a frame record is
    always read whole. Both files are renamed into place only when both are complete. Files written before (zlib'd
    frame members, no ArrayRecord compression) read the same.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    quantize, frames = tuple(quantize), tuple(frames)
    n = n_frames = 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(path))
        ftmp = stack.enter_context(atomic_path(frames_path(path))) if frame_records else None
        writer = ArrayRecordWriter(str(tmp), ARRAYRECORD_OPTIONS)
        stack.callback(writer.close)
        fwriter = ArrayRecordWriter(str(ftmp), FRAME_RECORD_OPTIONS) if ftmp is not None else None
        if fwriter is not None:
            stack.callback(fwriter.close)
        for rec in records:
            if fwriter is None:
                writer.write(encode_record(rec, quantize, frames))
            else:
                arrays, cines = _split_record(rec, quantize, frames)
                lengths = {arr.shape[-1] for arr in cines.values()}
                if len(lengths) > 1:
                    raise ValueError(f"record {n}: cine fields {sorted(cines)} have different frame counts {lengths}")
                arrays[_FRAMES_AT] = np.int64(n_frames)
                arrays[_FRAMES_U8] = np.asarray([k[: -len(_U8)] for k in cines if k.endswith(_U8)], dtype=np.str_)
                for t in range(lengths.pop() if lengths else 0):
                    fwriter.write(_npz_bytes({k: arr[..., t] for k, arr in cines.items()}, compress=False))
                    n_frames += 1
                writer.write(_npz_bytes(arrays))
            n += 1
    return n


class ArrayRecordSource(_GrainSource):
    """Grain source over one or more ArrayRecord files written by `write_arrayrecord`, decoding to dicts.

    `path_or_paths`: a file, a directory (all its `*.array_record` files but the `*.frames.array_record`
    companions, sorted) or a list of files. A file's companion, when present, is opened beside it and serves the
    `FrameStack`s of its records.
    """

    def __init__(self, path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]):
        from grain.sources import ArrayRecordDataSource

        if isinstance(path_or_paths, (str, os.PathLike)):
            p = Path(path_or_paths)
            paths = sorted(q for q in p.glob("*.array_record") if not q.name.endswith(".frames.array_record")
                           and not q.name.startswith(".")) if p.is_dir() else [p]
            if p.is_dir() and not paths:
                raise DataError(f"{p}: no *.array_record files in directory")
        else:
            paths = [Path(p) for p in path_or_paths]
        if not paths:
            raise DataError("ArrayRecordSource: no files given")
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: ArrayRecord file not found")
        self.paths = tuple(str(p) for p in paths)
        try:
            self._sources = [ArrayRecordDataSource([p]) for p in self.paths]
            self._frames = [ArrayRecordDataSource([str(frames_path(p))]) if frames_path(p).is_file() else None
                            for p in self.paths]
        except Exception as err:
            raise DataError(f"{', '.join(self.paths)}: cannot open ArrayRecord ({type(err).__name__}: {err})") \
                from None
        self._ends = np.cumsum([len(s) for s in self._sources])
        self._len = int(self._ends[-1])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} records")
        index %= self._len
        f = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[f - 1]) if f else 0)
        path = self.paths[f]
        try:
            data = self._sources[f][local]
        except Exception as err:
            raise DataError(f"{path}: cannot read record {local} ({type(err).__name__}: {err})") from None
        companion = self._frames[f]

        def read_frame(i: int) -> bytes:
            try:
                return companion[i]
            except Exception as err:
                raise DataError(f"{frames_path(path)}: cannot read frame record {i} ({type(err).__name__}: "
                                f"{err})") from None

        return decode_record(data, f"{path} record {local}", read_frame if companion is not None else None)

    def __repr__(self) -> str:
        return f"ArrayRecordSource(paths={list(self.paths)!r}, n={self._len})"


def _checked(src: CinemaLayoutSource, images: Sequence[str], cines: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The source's items, refusing intensities outside [0, 1] (uint8 storage would clip them) and cine views of
    different lengths (a frame record holds frame t of every view)."""
    for i in range(len(src)):
        rec = src[i]
        for key in images:
            lo, hi = float(np.min(rec[key])), float(np.max(rec[key]))
            if lo < -1e-3 or hi > 1 + 1e-3:
                view, phase = key.rsplit("_", 1)
                raise DataError(f"{src.path(i, view, phase)}: intensities span [{lo:.3g}, {hi:.3g}]; the layout "
                                "stores [0, 1] (uint8 / 255 or scaled float)")
        lengths = {k: rec[k].shape[-1] for k in cines}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{src.root / src.split / str(rec['pid'])}: cine views have different frame counts "
                            f"{lengths}")
        yield rec


def _check_layout_kind(src: CinemaLayoutSource, cine: bool, edes: bool) -> None:
    """Say which flag fits when the first subject has ED/ES files but no cine (what `data prepare` writes) or the
    reverse; otherwise a bare 'file not found' leaves the user guessing."""
    if not len(src):
        return
    view = src.views[0]
    ed, cine_file = src.path(0, view, "ed"), src.path(0, view, "t")
    if cine and not cine_file.exists() and ed.exists():
        raise DataError(f"{cine_file}: file not found (layouts made by `data prepare` have ED/ES but no cine files: "
                        "pack them with --no-cine)")
    if edes and not ed.exists() and cine_file.exists():
        raise DataError(f"{ed}: file not found (a cine-only layout: pack it with --cine-only)")


def pack_layout(root: str | os.PathLike, out_dir: str | os.PathLike, views: Sequence[str] = LAYOUT_VIEWS,
                cine: bool = True, edes: bool = True, with_labels: bool = True,
                splits: Sequence[str] = ("train", "val", "test"), overwrite: bool = False) -> dict[str, int]:
    """A CineMA processed layout (NIfTI) -> `<out_dir>/<split>.array_record` (+ `.frames.array_record` for cine).

    For pretraining at accelerator rates: images are stored as uint8 (the layout's [0, 1] intensities x 255, as the
    reference stores them), cine '<view>_t' one record per frame in the companion file, so a sample reads one frame
    of a subject. Splits without a `<split>_metadata.csv` are skipped. Written atomically; returns subjects per
    split.
    """
    root = Path(root)
    views = tuple(views)
    if not views:  # would pack records without images
        raise ConfigError(f"no views to pack (empty view list); choose from {', '.join(LAYOUT_VIEWS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    todo = [sp for sp in splits if (root / f"{sp}_metadata.csv").is_file()]
    if not todo:
        raise DataError(f"{root}: no {'/'.join(f'{sp}_metadata.csv' for sp in splits)}; not a CineMA layout")
    for split in todo:
        _check_layout_kind(CinemaLayoutSource(root, split, views, with_labels=False, cine=cine, edes=edes), cine,
                           edes)
    counts: dict[str, int] = {}
    with atomic_dir(out_dir, overwrite=overwrite, sources=(root,), kind="dataset") as tmp:
        for split in todo:
            src = CinemaLayoutSource(root, split, views, with_labels=with_labels, cine=cine, edes=edes)
            images = [f"{v}_{k}" for v in views for k in (("ed", "es") if edes else ()) + (("t",) if cine else ())]
            cines = [f"{v}_t" for v in views] if cine else []
            counts[split] = write_arrayrecord(tmp / f"{split}.array_record", _checked(src, images, cines),
                                              quantize=images, frames=cines, frame_records=bool(cines))
        info = {"kind": "cinema_layout", "root": str(root.resolve()), "views": list(views), "cine": cine,
                "edes": edes, "labels": with_labels and edes, "splits": counts, "quantized": "uint8"}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
    return counts


# ============================================================================================ SNRAware HDF5 cases
def _h5_cases(f) -> list[str]:
    """Paths of the groups (of an open h5py File) that hold a dataset named 'image'; '' for the root."""
    import h5py

    found = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] == "image":
            found.append(name.rsplit("/", 1)[0] if "/" in name else "")

    f.visititems(visit)
    return sorted(found)


class H5CaseSource(_GrainSource):
    """Grain source over the SNRAware reference's training files: HDF5 with `/<group>/<case>/{image, gmap}`.

    Each item: 'image' complex64 (x, y, t) (a real array is taken as magnitude, imaginary part 0; (x, y) as one
    frame), 'gmaps' float32 (x, y, 1 or t, N) when the case has a 'gmap' ((x, y) is one map), 'case' (the group
    path) and 'file'. Any group holding a dataset named 'image' is a case. Files are opened per read, so the source
    pickles into Grain workers as paths and an index.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        import h5py

        self.paths = tuple(str(p) for p in paths)
        if not self.paths:
            raise DataError("H5CaseSource: no files given")
        cases = []
        for path in self.paths:
            if not Path(path).is_file():
                raise DataError(f"{path}: HDF5 file not found")
            try:
                with h5py.File(path, "r") as f:
                    cases += [(path, c) for c in _h5_cases(f)]
            except Exception as err:
                raise DataError(f"{path}: cannot read HDF5 ({type(err).__name__}: {err})") from None
        if not cases:
            raise DataError(f"{', '.join(self.paths)}: no case groups holding an 'image' dataset")
        self._cases = cases

    def __len__(self) -> int:
        return len(self._cases)

    def __repr__(self) -> str:
        return f"H5CaseSource(paths={list(self.paths)!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        import h5py

        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        path, case = self._cases[index]
        where = f"{path}:/{case}"
        try:
            with h5py.File(path, "r") as f:
                group = f[case] if case else f
                image = np.asarray(group["image"])
                gmap = np.asarray(group["gmap"]) if "gmap" in group else None
        except Exception as err:
            raise DataError(f"{where}: cannot read ({type(err).__name__}: {err})") from None
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.dtype.kind not in "fciu":
            raise DataError(f"{where}: 'image' must be a numeric (x, y, t) or (x, y) array, got {image.dtype} "
                            f"{image.shape}")
        image = image.astype(np.complex64)
        if not np.isfinite(image).all():
            raise DataError(f"{where}: 'image' holds NaN or infinite values")
        if not image.size or not image.any():
            raise DataError(f"{where}: 'image' {image.shape} is empty or all zero (nothing to denoise)")
        out: dict[str, Any] = {"image": image, "case": case, "file": path}
        if gmap is not None:
            if gmap.ndim == 2:
                gmap = gmap[:, :, None, None]
            if (gmap.ndim != 4 or gmap.shape[:2] != image.shape[:2] or gmap.shape[2] not in (1, image.shape[2])
                    or gmap.shape[3] == 0):
                raise DataError(f"{where}: 'gmap' must be (x, y) or (x, y, 1 or t, N) matching the image "
                                f"{image.shape}, got {gmap.shape}")
            gmap = gmap.astype(np.float32)
            if not np.isfinite(gmap).all() or (gmap <= 0).any():
                raise DataError(f"{where}: 'gmap' must be finite and positive (g-factors are >= 1)")
            out["gmaps"] = gmap
        return out


def h5_source(data_config, split: str) -> H5CaseSource:
    """data.path: a pattern with '{split}' (a file or a directory of *.h5), or a directory holding `<split>.h5` or
    `<split>/*.h5`."""
    path = Path(str(_required(data_config, "path", "h5")).format(split=split))
    if path.is_dir() and "{split}" not in str(_get(data_config, "path")):
        if (path / f"{split}.h5").is_file():
            return H5CaseSource([path / f"{split}.h5"])
        path = path / split
    if path.is_dir():
        files = sorted(list(path.glob("*.h5")) + list(path.glob("*.hdf5")))
        if not files:
            raise DataError(f"{path}: no *.h5 files")
        return H5CaseSource(files)
    if not path.is_file():
        raise DataError(f"{path}: HDF5 file or directory for split {split!r} not found")
    return H5CaseSource([path])


# ======================================================================================== synthetic -> ArrayRecord
def synthetic_record(seed: int, index: int, cfg=None, views: Sequence[str] | None = None,
                     cine: bool = False) -> dict[str, Any]:
    """One phantom subject as a layout-style record (same keys as `CinemaLayoutSource` items).

    '<view>_ed' / '<view>_es' float32 in [0, 1] (SAX (x, y, z), LAX (x, y)), '<view>_ed_gt' / '<view>_es_gt' uint8,
    LAX '<view>_ed_landmarks' / '<view>_es_landmarks' (3, 2) pixel (x, y), '<view>_spacing' mm, optional
    '<view>_t' cine (x, y[, z], t), plus the phantom metadata (ed_frame, es_frame, lv_edv... mL / %, phenotype,
    site/... fields).
    """
    from cinema_jax.data import phantom

    cfg = cfg if cfg is not None else phantom.PhantomConfig()
    views = tuple(views) if views is not None else tuple(phantom.VIEWS)
    subject = phantom.sample_subject(seed, index, cfg)
    meta = phantom.subject_metadata(subject, cfg)
    ed, es = int(meta["ed_frame"]), int(meta["es_frame"])
    frames = list(range(cfg.n_frames)) if cine else [ed, es]
    rendered = phantom.render(subject, frames, views, cfg, labels=True)
    pick = {"ed": frames.index(ed), "es": frames.index(es)}
    rec: dict[str, Any] = {"pid": f"synth_{seed}_{index:06d}"}
    for view in views:
        img, lab = rendered[view], rendered[f"{view}_label"]
        for phase, k in pick.items():
            rec[f"{view}_{phase}"] = np.ascontiguousarray(img[k], np.float32)
            rec[f"{view}_{phase}_gt"] = np.ascontiguousarray(lab[k], np.uint8)
            if f"{view}_landmarks" in rendered:
                rec[f"{view}_{phase}_landmarks"] = np.asarray(rendered[f"{view}_landmarks"][k], np.float32)
        if f"{view}_spacing" in rendered:
            rec[f"{view}_spacing"] = np.asarray(rendered[f"{view}_spacing"], np.float32)
        if cine:
            rec[f"{view}_t"] = np.ascontiguousarray(np.moveaxis(img, 0, -1), np.float32)
    for key, value in meta.items():
        rec[key] = _plain(value)
    return rec


def _plain(value):
    """Metadata values -> arrays / str / nested dicts that `encode_record` accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError:
            return str(value)
    return value


def _image_keys(record: Mapping[str, Any]) -> list[str]:
    return [k for k in record if re.fullmatch(r"(sax|lax_[234]c)_(ed|es|t)", k)]


def write_synthetic_dataset(out_dir: str | os.PathLike, n_subjects: int = 32, seed: int = 0,
                            val_fraction: float = 0.25, cfg=None, views: Sequence[str] | None = None,
                            cine: bool = False, overwrite: bool = False) -> dict[str, int]:
    """Render `n_subjects` phantom subjects into `<out_dir>/{train,val}.array_record` (+ `info.json`).

    Images are stored quantised to uint8 (as the reference stores processed data) and decode to float32 in [0, 1].
    `cine`: every frame too ('<view>_t', in `<split>.frames.array_record`, one record per frame: see
    `write_arrayrecord`). The last round(n * val_fraction) subject indices (>= 1 when n >= 2) form `val`. Written
    atomically.
    """
    if n_subjects < 1:
        raise ConfigError(f"n_subjects must be >= 1, got {n_subjects}")
    n_val = min(n_subjects - 1, max(1, int(round(n_subjects * val_fraction)))) if n_subjects >= 2 else 0
    splits = {"train": range(0, n_subjects - n_val), "val": range(n_subjects - n_val, n_subjects)}

    def records(indices):
        for i in indices:
            yield synthetic_record(seed, i, cfg, views, cine)

    counts = {}
    with atomic_dir(out_dir, overwrite=overwrite, kind="dataset") as tmp:
        first = synthetic_record(seed, 0, cfg, views, cine)
        quantize = _image_keys(first)
        frames = [k for k in quantize if k.endswith("_t")]
        for split, idx in splits.items():
            if len(idx):
                counts[split] = write_arrayrecord(tmp / f"{split}.array_record", records(idx), quantize, frames,
                                                  frame_records=cine)
        info = {"kind": "synthetic", "seed": seed, "n_subjects": n_subjects, "splits": counts,
                "keys": sorted(first), "quantized": quantize, "cine": cine}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
    return counts


class SyntheticIndexSource(_GrainSource):
    """Light source for on-the-fly phantom rendering: item i = {'seed', 'index'} (the task's transform renders)."""

    def __init__(self, n_subjects: int, seed: int = 0, offset: int = 0):
        self.n, self.seed, self.offset = int(n_subjects), int(seed), int(offset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} subjects")
        return {"seed": np.int64(self.seed), "index": np.int64(self.offset + index)}

    def __repr__(self) -> str:
        return f"SyntheticIndexSource(n_subjects={self.n}, seed={self.seed}, offset={self.offset})"


# ============================================================================================== config dispatch
def _get(cfg, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def _required(cfg, key: str, source: str):
    value = _get(cfg, key)
    if value in (None, ""):
        raise ConfigError(f"data.{key} is required for data.source={source!r}")
    return value


def cinema_layout_source(data_config, split: str) -> CinemaLayoutSource:
    """data.root (processed dataset dir), data.views (default ('sax',)), data.with_labels (default True),
    data.cine / data.edes (defaults False / True: see `CinemaLayoutSource`)."""
    return CinemaLayoutSource(_required(data_config, "root", "cinema_layout"), split,
                              tuple(_get(data_config, "views", ("sax",))), bool(_get(data_config, "with_labels", True)),
                              cine=bool(_get(data_config, "cine", False)), edes=bool(_get(data_config, "edes", True)))


def arrayrecord_source(data_config, split: str) -> ArrayRecordSource:
    """data.path: a directory holding `<split>.array_record` or a pattern with '{split}'."""
    path = str(_required(data_config, "path", "arrayrecord"))
    if "{split}" in path:
        return ArrayRecordSource(path.format(split=split))
    p = Path(path)
    return ArrayRecordSource(p / f"{split}.array_record" if p.is_dir() else p)


def sunnybrook_source(data_config, split: str) -> SunnybrookSource:
    """data.root (Sunnybrook dir), data.mode ('volume' | 'slice'), data.preprocess, data.subjects (per-split dict
    or list; default: all subjects for every split, as Sunnybrook here is an evaluation set)."""
    subjects = _get(data_config, "subjects")
    if isinstance(subjects, Mapping) or hasattr(subjects, "keys"):
        subjects = _get(subjects, split)
    return SunnybrookSource(_required(data_config, "root", "sunnybrook"), str(_get(data_config, "mode", "volume")),
                            bool(_get(data_config, "preprocess", False)), subjects)


def synthetic_source(data_config, split: str) -> SyntheticIndexSource:
    """data.n_subjects: int or per-split dict (default train 64 / val 16 / test 16); data.seed (default 0).

    Splits use disjoint index ranges (train from 0, val from 1_000_000, test from 2_000_000)."""
    n = _get(data_config, "n_subjects", {"train": 64, "val": 16, "test": 16})
    if isinstance(n, Mapping) or hasattr(n, "keys"):
        n = _get(n, split, 16)
    offsets = {"train": 0, "val": 1_000_000, "test": 2_000_000}
    return SyntheticIndexSource(int(n), int(_get(data_config, "seed", 0)), offsets.get(split, 3_000_000))


SOURCES = {"cinema_layout": cinema_layout_source, "arrayrecord": arrayrecord_source,
           "sunnybrook": sunnybrook_source, "synthetic": synthetic_source, "h5": h5_source}


def make_source(data_config, split: str):
    """Build the RandomAccessDataSource named by `data_config.source` for `split` ('train' / 'val' / 'test')."""
    name = _get(data_config, "source")
    if name not in SOURCES:
        raise ConfigError(f"data.source={name!r} is unknown; choose from {sorted(SOURCES)}")
    return SOURCES[name](data_config, split)
