"""The CineMA processed layout: its preprocessing, its reader, and its packing into ArrayRecord.

Why: every task reads the same per-subject dict of numpy arrays, whatever the storage, so one `transform` serves the
built-in synthetic data, prepared ACDC / M&Ms / M&Ms2 (`data/prepare.py` writes this layout), packed ArrayRecord
(`pack_layout`) and Sunnybrook:

    '<view>_ed', '<view>_es'          float32 images in [0, 1]: SAX (x, y, z), LAX (x, y)
    '<view>_ed_gt', '<view>_es_gt'    uint8 labels, same shape (0 BG, 1 RV, 2 MYO, 3 LV)
    'pid' (str) and the metadata columns (ed_frame, es_frame, lv_edv, lv_esv, lv_ef, rv_... in mL / %)

The preprocessing (resample, crop around the LV, percentile scaling, label volumes) lives here because it defines
the layout's grid; preparation and Sunnybrook apply it. Sources are grain `RandomAccessDataSource`s (`__len__`,
`__getitem__`, stable `__repr__` so Grain iterator checkpoints can verify them) and hold only paths / small arrays,
so they pickle cheaply into Grain workers. numpy / scipy / nibabel / grain only: nothing here imports jax.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from grain.sources import RandomAccessDataSource
from scipy import ndimage

from cinema_jax.data.arrayrecord import write_arrayrecord
from cinema_jax.data.io import Volume, read_nifti
from cinema_jax.data.phantom import VIEWS
from cinema_jax.errors import ConfigError, DataError
from cinema_jax.fileutil import atomic_dir, atomic_path

SAX_SPACING = (1.0, 1.0, 10.0)  # mm, CineMA SAX grid
LAX_SPACING = (1.0, 1.0)  # mm in-plane
SAX_SIZE = (192, 192)
LAX_SIZE = (256, 256)
PERCENTILES = (0.95, 99.5)
LV, MYO, RV = 3, 2, 1
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


class CinemaLayoutSource(RandomAccessDataSource):
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
        bad = [v for v in self.views if v not in VIEWS]
        if bad:
            raise ConfigError(f"unknown view(s) {bad}; views are {VIEWS}")
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


# =============================================================================================== layout -> ArrayRecord
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


def pack_layout(root: str | os.PathLike, out_dir: str | os.PathLike, views: Sequence[str] = VIEWS,
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
        raise ConfigError(f"no views to pack (empty view list); choose from {', '.join(VIEWS)}")
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
