"""Medical-image readers and writers: NIfTI (nibabel) and DICOM cine series (pydicom), numpy only.

Why one module: every file that enters the package passes through here, so every failure mode (missing file,
truncated gzip, random bytes, wrong dimensionality, NaN/Inf, DICOM without pixel data, mixed series) becomes ONE
`cinema_jax.errors.DataError` whose message names the file.

Array convention: `Volume.array` is (x, y[, z][, t]) with x the FIRST axis, the reference's order (the transpose of
the SimpleITK / DICOM row-major array): for DICOM, x runs along a row (column index) and y down the rows.
`Volume.affine` maps voxel indices (x, y, z) to RAS+ world millimetres (NIfTI convention), so a DICOM series can be
written to NIfTI unchanged. `Volume.spacing` holds the spatial spacings in mm, one per spatial axis.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cinema_jax.errors import DataError
from cinema_jax.fileutil import atomic_path

# DICOM patient frame is LPS, NIfTI world is RAS: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
# Most voxels (or DICOM pixels x frames x samples) one image may declare: 2**30 is 4 GiB as float32, beyond any
# cardiac scan (a 256 x 256 x 20 slices x 50 frames cine is 6.6e7) yet readable. Headers are checked against it, and
# against the bytes their file actually holds, before anything is allocated: the header alone sizes the array.
MAX_VOXELS = 2**30
# deflate cannot expand input by more than ~1032x, so a .gz of S bytes holds at most this many times S uncompressed
_MAX_DEFLATE_RATIO = 1100


@dataclass
class Volume:
    """An image with geometry.

    array: float32 (x, y[, z][, t]) (labels may be read as an integer dtype); spacing: mm per spatial axis (len 2
    or 3); affine: (4, 4) float64 voxel index (x, y, z) -> RAS mm; meta: reader-specific extras (e.g. for DICOM
    `files` [z][t] paths, `trigger_times` (z, t) ms, `series_uid`).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def check_array(array, name: str = "array", ndim: int | Sequence[int] | None = None, path=None,
                finite: bool = True) -> np.ndarray:
    """Validate an array read from `path`: allowed dimensionality, non-empty, all finite; returns it as ndarray.

    Raises DataError naming `path` (or `name` when there is no file) so the user knows which input is bad.
    """
    where = f"{path}" if path is not None else name
    arr = np.asarray(array)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise DataError(f"{where}: {name} has {arr.ndim} dimensions {arr.shape}, expected {want}")
    if arr.size == 0:
        raise DataError(f"{where}: {name} is empty (shape {arr.shape})")
    if finite and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"{where}: {name} holds {bad} NaN/Inf values of {arr.size}")
    return arr


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


# ------------------------------------------------------------------------------------------------------------ NIfTI
def _gunzipped_size(path: Path, limit: int) -> int:
    """Uncompressed bytes of a gzip file (every member), counted up to `limit` in 1 MiB steps; a truncated stream
    counts what came out before the cut."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while n < limit:
                chunk = f.read(min(2**20, limit - n))
                if not chunk:
                    break
                n += len(chunk)
    except (EOFError, zlib.error):
        pass
    return n


def _check_declared_size(path: Path, img) -> None:
    """Refuse a header declaring more than MAX_VOXELS voxels, or more data than its file holds, before nibabel
    allocates the array from the header alone (a 100-byte .nii.gz claiming 4096**3 voxels asked for 256 GiB)."""
    header = img.header
    shape = tuple(int(d) for d in header.get_data_shape())
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise DataError(f"{path}: header declares shape {shape} = {voxels} voxels, more than the limit of "
                        f"{MAX_VOXELS} (MAX_VOXELS)")
    try:
        data_file = Path(img.file_map["image"].filename)
        # the proxy's offset is the file's vox_offset (the loaded header's is reset for writing)
        need = int(img.dataobj.offset) + voxels * header.get_data_dtype().itemsize
    except (AttributeError, KeyError, TypeError):  # a format without a data offset: nothing more to compare
        return
    size = data_file.stat().st_size
    if not data_file.name.lower().endswith(".gz"):
        have = size
    elif need > _MAX_DEFLATE_RATIO * size:
        raise DataError(f"{path}: header declares {need} bytes (shape {shape}), more than a {size}-byte gzip file "
                        "can hold: truncated or a false header")
    else:
        with open(data_file, "rb") as f:  # the trailer's ISIZE: the last member's length mod 2**32
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        # conclusive only below 4 GiB and for one member: a short ISIZE is confirmed by counting (bounded memory)
        have = need if need >= 2**32 or isize >= need else _gunzipped_size(data_file, need)
    if have < need:
        raise DataError(f"{path}: truncated: header declares {need} bytes (shape {shape}, "
                        f"{header.get_data_dtype()}) but the file holds {have}")


def _raw_pixdim(path: Path, header_class) -> np.ndarray:
    """pixdim as stored in the file: nibabel's loaded header has already replaced zero voxel sizes by 1."""
    import gzip

    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
        return np.asarray(header_class.from_fileobj(f, check=False)["pixdim"], np.float64)


def read_nifti(path: str | os.PathLike, ndim: int | Sequence[int] | None = None,
               dtype=np.float32, allow_complex: bool = False) -> Volume:
    """Read a .nii / .nii.gz file into a Volume (array (x, y[, z][, t]) as `dtype`, spacing from the header zooms).

    `ndim` restricts the allowed dimensionality (e.g. 3 for an ED frame, (3, 4) for frame or cine). Integer
    `dtype` (labels) requires integral values. Complex data is refused (casting would drop the imaginary part)
    unless `allow_complex`, which returns it as complex64.
    """
    import nibabel as nib

    path = Path(path)
    _require_file(path)
    try:
        img = nib.load(str(path))
        _check_declared_size(path, img)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        raw = _raw_pixdim(path, type(img.header))
    except DataError:
        raise
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, ValueError...
        raise DataError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from None
    data = check_array(data, "image", ndim=ndim, path=path)
    if data.dtype.kind == "c":
        if not allow_complex:
            raise DataError(f"{path}: image holds complex values; this needs a real (magnitude) image")
        dtype = np.complex64
    if np.dtype(dtype).kind in "iu":
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: label image holds non-integer values")
        out = data.astype(dtype)
    else:
        out = data.astype(dtype, copy=False)
    n_spatial = min(out.ndim, 3)
    # nibabel would quietly read a zero as 1 mm: volumes (mL) and resampling would be silently wrong (a singleton
    # axis, e.g. one LAX plane stored as (x, y, 1, t), has no spacing to get wrong and is let through)
    bad = [i for i in range(n_spatial) if out.shape[i] > 1 and not (np.isfinite(raw[1 + i]) and raw[1 + i] > 0)]
    if bad:
        raise DataError(f"{path}: NIfTI header voxel size pixdim[1:{1 + n_spatial}] = "
                        f"{[float(v) for v in raw[1:1 + n_spatial]]} is not positive")
    spacing = tuple(zooms[:n_spatial]) if len(zooms) >= n_spatial else tuple(
        float(np.linalg.norm(affine[:3, i])) for i in range(n_spatial))
    meta = {"path": str(path)}
    if out.ndim == 4 and len(zooms) > 3:
        meta["frame_interval"] = zooms[3]
    return Volume(np.ascontiguousarray(out), spacing, affine, meta)


def spacing_affine(spacing: Sequence[float]) -> np.ndarray:
    """A (4, 4) affine with the given voxel spacing (mm) and the origin at voxel 0."""
    aff = np.eye(4)
    for i, s in enumerate(list(spacing)[:3]):
        aff[i, i] = float(s)
    return aff


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None,
                spacing: Sequence[float] | None = None) -> Path:
    """Atomically write `array` (x, y[, z][, t]) to .nii(.gz); geometry from `affine` or else `spacing` (mm).

    The dtype is kept (uint8 labels stay uint8). Refuses NaN/Inf so a bad array never lands on disk.
    """
    import nibabel as nib

    path = Path(path)
    arr = check_array(array, "array to write", ndim=(2, 3, 4), path=path)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if affine is None:
        affine = spacing_affine(spacing if spacing is not None else (1.0,) * min(arr.ndim, 3))
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: affine must be a finite (4, 4) matrix, got shape {affine.shape}")
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "msec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


# ------------------------------------------------------------------------------------------------------------ DICOM
def _list_dicom_files(dir_or_files) -> tuple[list[Path], bool]:
    if isinstance(dir_or_files, (str, os.PathLike)):
        root = Path(dir_or_files)
        if not root.exists():
            raise DataError(f"{root}: DICOM directory or file not found")
        if root.is_file():
            return [root], True
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in _DICOM_SUFFIXES and p.name.upper() != "DICOMDIR")
        if not files:
            raise DataError(f"{root}: no DICOM files (*.dcm or no suffix) found")
        return files, False
    files = [Path(p) for p in dir_or_files]
    if not files:
        raise DataError("read_dicom_series: empty list of DICOM files")
    return files, True


class _NotDicom(DataError):
    """A file without the DICOM preamble: skipped inside a directory, an error when named explicitly."""


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.suffix and path.is_file() and path.stat().st_size == 0:  # e.g. an empty README beside the images
        raise _NotDicom(f"{path}: not a DICOM file (empty)")
    _require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
    except InvalidDicomError as err:
        raise _NotDicom(f"{path}: not a DICOM file ({err})") from None
    except Exception as err:
        raise DataError(f"{path}: cannot read DICOM ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    _check_pixel_size(path, ds)
    return ds


def _check_pixel_size(path: Path, ds) -> None:
    """Rows x Columns x frames x samples must be within MAX_VOXELS and, for an uncompressed transfer syntax, held by
    PixelData: the header alone sizes the series array (65535 x 65535 claims 16 GiB per image)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
    except (TypeError, ValueError):
        raise DataError(f"{path}: DICOM Rows / Columns / NumberOfFrames / SamplesPerPixel / BitsAllocated are not "
                        "integers") from None
    pixels = rows * cols * frames * samples
    if pixels > MAX_VOXELS:
        raise DataError(f"{path}: DICOM header declares {rows} x {cols} pixels x {frames} frames x {samples} "
                        f"samples = {pixels}, more than the limit of {MAX_VOXELS} (MAX_VOXELS)")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed or bits < 1:
        return  # encapsulated frames are sized by their decoder; the voxel limit above still holds
    need = (pixels * bits + 7) // 8
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        need = need // 3 * 2  # two chroma samples shared by each pixel pair
    have = len(ds.PixelData)
    if have < need:
        raise DataError(f"{path}: DICOM PixelData holds {have} bytes but {rows} x {cols} pixels x {frames} frames x "
                        f"{samples} samples x {bits} bits need {need}: truncated or a false header")


def _pixels(path: Path, ds) -> np.ndarray:
    """(x, y) float32 pixel values of one single-frame DICOM image with rescale slope/intercept applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as err:
        raise DataError(f"{path}: cannot decode DICOM pixel data ({type(err).__name__}: {err})") from None
    arr = check_array(arr, "DICOM pixel data", ndim=2, path=path).astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    return arr.T  # (rows, cols) -> (x = column, y = row)


def _floats(ds, key: str, n: int, path: Path) -> np.ndarray | None:
    val = ds.get(key)
    if val is None:
        return None
    try:
        out = np.asarray([float(v) for v in val], np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: DICOM {key} is not numeric: {val!r}") from None
    if out.shape != (n,) or not np.isfinite(out).all():
        raise DataError(f"{path}: DICOM {key} must hold {n} finite numbers, got {val!r}")
    return out


def _series_label(uid: str, items: list) -> str:
    desc = str(items[0][1].get("SeriesDescription", "")).strip()
    return f"{uid} ({len(items)} images{', ' + desc if desc else ''})"


def read_dicom_series(dir_or_files: str | os.PathLike | Iterable[str | os.PathLike],
                      series_uid: str | None = None) -> Volume:
    """Read a (cine) DICOM series into a Volume with array (x, y, z, t) float32.

    Images are grouped by SeriesInstanceUID (several series and no `series_uid` -> DataError listing them), sorted
    into slices by their position along the slice normal (ImagePositionPatient . (row x column direction)) and, within
    a slice, into frames by TriggerTime (InstanceNumber when absent). Spacing = (column spacing, row spacing, step
    between slice positions) mm; the affine maps (x, y, z) to RAS mm. meta: `files` [z][t] paths,
    `trigger_times` (z, t) ms, `slice_positions` (z,) mm along the normal, `series_uid`, `slice_thickness`.
    Header-validation warnings (e.g. non-conformant UIDs, common in anonymised data) are silenced.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)  # pydicom also *logs* each validation warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_dicom_series(dir_or_files, series_uid)
    finally:
        logger.setLevel(level)


def _read_dicom_series(dir_or_files, series_uid: str | None) -> Volume:
    """Implementation of `read_dicom_series` (warnings already silenced)."""
    files, explicit = _list_dicom_files(dir_or_files)
    series: dict[str, list] = {}
    skipped: list[_NotDicom] = []
    for f in files:
        try:
            ds = _read_header(f)
        except _NotDicom as err:  # e.g. a README beside the images: skip suffix-less non-DICOM files in a directory
            if explicit or f.suffix:  # a named file or a '.dcm' that is not DICOM is corrupt, not a stray file
                raise
            skipped.append(err)
            continue
        uid = str(ds.get("SeriesInstanceUID", "unknown"))
        series.setdefault(uid, []).append((f, ds))
    if not series:
        raise DataError(f"{files[0].parent}: none of the {len(files)} files is DICOM ({skipped[0]})")
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(f"{files[0].parent}: series {series_uid} not found; series present: "
                            + "; ".join(_series_label(u, v) for u, v in series.items()))
        items = series[series_uid]
    elif len(series) > 1:
        raise DataError(f"{files[0].parent}: {len(series)} DICOM series found, choose one with --series-uid UID "
                        "(series_uid=): " + "; ".join(_series_label(u, v) for u, v in sorted(series.items())))
    else:
        series_uid, items = next(iter(series.items()))

    f0, ds0 = items[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, f0)
    ps = _floats(ds0, "PixelSpacing", 2, f0)
    if ps is None:
        ps = np.ones(2)
    row_dir, col_dir = (iop[:3], iop[3:]) if iop is not None else (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    norms = (float(np.linalg.norm(row_dir)), float(np.linalg.norm(col_dir)))
    # slice sorting and the affine need two real axes (all zeros used to fail later as 'no left ventricle found')
    if not all(0.9 < n < 1.1 for n in norms) or abs(float(row_dir @ col_dir)) > 0.1:
        raise DataError(f"{f0}: DICOM ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    normal = np.cross(row_dir, col_dir)
    shape0 = (int(ds0.get("Rows", 0)), int(ds0.get("Columns", 0)))

    records = []  # (position along normal, time key, path, ds, ipp)
    for f, ds in items:
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape0:
            raise DataError(f"{f}: image size {ds.get('Rows')}x{ds.get('Columns')} differs from the series' "
                            f"{shape0[0]}x{shape0[1]} ({f0.name})")
        ipp = _floats(ds, "ImagePositionPatient", 3, f)
        pos = float(ipp @ normal) if ipp is not None else 0.0
        tt = ds.get("TriggerTime")
        tkey = float(tt) if tt not in (None, "") else float(ds.get("InstanceNumber", 0) or 0)
        records.append((pos, tkey, f, ds, ipp))

    # Cluster slice positions (tolerance 0.01 mm) and sort frames within each slice by trigger time.
    records.sort(key=lambda r: (r[0], r[1]))
    slices: list[list] = []
    for rec in records:
        if slices and abs(rec[0] - slices[-1][0][0]) < 1e-2:
            slices[-1].append(rec)
        else:
            slices.append([rec])
    n_frames = {len(s) for s in slices}
    if len(n_frames) != 1:
        counts = ", ".join(f"{s[0][0]:.2f} mm: {len(s)}" for s in slices)
        raise DataError(f"{f0.parent}: slices have different numbers of frames ({counts})")
    nt = n_frames.pop()
    nz = len(slices)
    voxels = shape0[0] * shape0[1] * nz * nt
    if voxels > MAX_VOXELS:
        raise DataError(f"{f0.parent}: the series is {shape0[1]} x {shape0[0]} x {nz} x {nt} = {voxels} voxels, "
                        f"more than the limit of {MAX_VOXELS} (MAX_VOXELS)")

    arr = np.empty((shape0[1], shape0[0], nz, nt), np.float32)
    times = np.zeros((nz, nt))
    paths: list[list[str]] = []
    for z, sl in enumerate(slices):
        sl.sort(key=lambda r: r[1])
        paths.append([str(r[2]) for r in sl])
        for t, (_, tkey, f, ds, _) in enumerate(sl):
            arr[:, :, z, t] = _pixels(f, ds)
            times[z, t] = tkey
    positions = np.array([s[0][0] for s in slices])
    thickness = float(ds0.get("SliceThickness", 0) or 0)
    if nz > 1:
        dz = float(np.median(np.diff(positions)))
    else:
        dz = float(ds0.get("SpacingBetweenSlices", 0) or thickness or 1.0)

    origin = slices[0][0][4] if slices[0][0][4] is not None else np.zeros(3)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = origin
    meta = {"files": paths, "trigger_times": times, "slice_positions": positions, "series_uid": series_uid,
            "slice_thickness": thickness, "path": str(f0.parent)}
    return Volume(arr, (float(ps[1]), float(ps[0]), dz), _LPS_TO_RAS @ lps, meta)
