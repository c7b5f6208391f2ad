"""Raw public releases (ACDC, M&Ms, M&Ms-2) -> the CineMA processed layout (`cinema-jax data prepare`).

Why a module of its own: each release has its own folder tree, frame numbering, metadata CSV and label order; this
reads them into one `RawSubject` form and writes the layout that `data/layout.py` reads, with the layout's
preprocessing, so nothing downstream knows which release a subject came from. numpy / nibabel only: no jax.
"""

from __future__ import annotations

import configparser
import csv
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cinema_jax.data.io import Volume, read_nifti, write_nifti
from cinema_jax.data.layout import (
    LAX_SIZE,
    LAX_SPACING,
    LV,
    MYO,
    PERCENTILES,
    RV,
    SAX_SIZE,
    SAX_SPACING,
    ejection_fraction,
    label_volumes_ml,
    preprocess_view,
    write_metadata_csv,
)
from cinema_jax.errors import ConfigError, DataError
from cinema_jax.fileutil import atomic_dir


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
