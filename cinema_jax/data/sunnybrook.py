"""Sunnybrook Cardiac Data: SAX cine DICOM with expert contours, rasterised to ACDC-ordered LV / MYO labels.

Why a module of its own: Sunnybrook is an evaluation set with its own storage (one DICOM folder and one folder of
contour text files per subject, contours on some slices at two frames), so it is read into `SunnybrookSubject`s
(volumes and EF over the contoured slices) and served to fine-tuning / evaluation by `SunnybrookSource`, optionally
with the CineMA layout's preprocessing (`data/layout.py`). numpy / pydicom only: no jax.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from grain.sources import RandomAccessDataSource

from cinema_jax.data.io import Volume, check_array, read_dicom_series
from cinema_jax.data.layout import (
    LV,
    MYO,
    SAX_SIZE,
    SAX_SPACING,
    ejection_fraction,
    label_volumes_ml,
    normalise_intensity,
    preprocess_view,
)
from cinema_jax.errors import ConfigError, DataError


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


class SunnybrookSource(RandomAccessDataSource):
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
