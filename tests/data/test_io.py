"""NIfTI / DICOM readers: roundtrips, geometry, and one clear DataError naming the file for every bad input."""

import gzip

import numpy as np
import pytest
from helpers import dicom_dataset
from pydicom.uid import generate_uid

from cinema_jax.data.io import Volume, check_array, read_dicom_series, read_nifti, write_nifti
from cinema_jax.errors import DataError


# ------------------------------------------------------------------------------------------------------------ NIfTI
def test_nifti_roundtrip_keeps_array_spacing_affine(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((12, 10, 4)).astype(np.float32)
    affine = np.array([[0, -1.5, 0, 10], [1.5, 0, 0, -4], [0, 0, 8, 2], [0, 0, 0, 1]], float)
    path = write_nifti(tmp_path / "a.nii.gz", arr, affine=affine)
    vol = read_nifti(path, ndim=3)
    assert isinstance(vol, Volume)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, affine)
    np.testing.assert_allclose(vol.spacing, (1.5, 1.5, 8.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # no temp files left


def test_nifti_roundtrip_labels_4d_and_spacing(tmp_path):
    lab = np.random.default_rng(1).integers(0, 4, (6, 5, 3)).astype(np.uint8)
    write_nifti(tmp_path / "l.nii.gz", lab, spacing=(1.25, 1.25, 10.0))
    vol = read_nifti(tmp_path / "l.nii.gz", dtype=np.uint8)
    assert vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array, lab)
    assert vol.spacing == pytest.approx((1.25, 1.25, 10.0))
    cine = np.zeros((4, 4, 2, 5), np.float32)
    write_nifti(tmp_path / "c.nii", cine, spacing=(2, 2, 6))
    assert read_nifti(tmp_path / "c.nii", ndim=(3, 4)).array.shape == (4, 4, 2, 5)


def _valid_nifti(tmp_path, name="img.nii.gz"):
    return write_nifti(tmp_path / name, np.ones((8, 8, 3), np.float32))


def test_nifti_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.nii.gz.*not found"):
        read_nifti(tmp_path / "nope.nii.gz")


def test_nifti_truncated_gz(tmp_path):
    path = _valid_nifti(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="img.nii.gz"):
        read_nifti(path)


def test_nifti_random_bytes_and_empty(tmp_path):
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match="junk.nii.gz"):
        read_nifti(bad)
    raw = tmp_path / "junk.nii"
    raw.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(DataError, match="junk.nii"):
        read_nifti(raw)
    gz_garbage = tmp_path / "gz.nii.gz"
    gz_garbage.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(DataError, match="gz.nii.gz"):
        read_nifti(gz_garbage)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.nii.gz.*empty"):
        read_nifti(empty)


def test_nifti_wrong_ndim(tmp_path):
    path = _valid_nifti(tmp_path, "three.nii.gz")
    with pytest.raises(DataError, match="three.nii.gz.*3 dimensions.*expected 4"):
        read_nifti(path, ndim=4)


def test_nifti_nan_filled(tmp_path):
    import nibabel as nib

    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), np.nan, np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="nan.nii.gz.*NaN"):
        read_nifti(path)


def test_nifti_non_integer_labels(tmp_path):
    path = write_nifti(tmp_path / "frac_gt.nii.gz", np.full((4, 4, 2), 0.5, np.float32))
    with pytest.raises(DataError, match="frac_gt.nii.gz.*non-integer"):
        read_nifti(path, dtype=np.uint8)


def test_write_nifti_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="out.nii.gz.*NaN"):
        write_nifti(tmp_path / "out.nii.gz", np.full((3, 3, 3), np.nan, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_check_array():
    check_array(np.zeros((2, 2)), "x", ndim=2)
    with pytest.raises(DataError, match="f.nii.*expected 3 or 4"):
        check_array(np.zeros((2, 2)), "image", ndim=(3, 4), path="f.nii")
    with pytest.raises(DataError, match="empty"):
        check_array(np.zeros((0, 2)), "x")
    with pytest.raises(DataError, match="Inf"):
        check_array(np.array([1.0, np.inf]), "x")


# ------------------------------------------------------------------------------------------------------------ DICOM
ROW, COL = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # normal = row x col = (-1, 0, 0)


def _dicom(path, series, z_mm, frame, pixels, spacing=(1.5, 1.25), pixel_data=True, instance=1, slope=None):
    ds = dicom_dataset()
    ds.SeriesInstanceUID = series
    ds.SeriesDescription = "cine sax"
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [*ROW, *COL]
    ds.ImagePositionPatient = [float(-z_mm), 5.0, 7.0]  # position along normal (-1, 0, 0) = z_mm
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 8.0
    ds.TriggerTime = 40.0 * frame
    ds.Rows, ds.Columns = pixels.shape
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, 10
    if pixel_data:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _series(tmp_path, nz=3, nt=4, uid=None, rows=6, cols=5):
    """Files named in a scrambled order; value = 100 * z + 10 * t + row-index so order is checkable."""
    uid = uid or generate_uid()
    d = tmp_path / "dicom"
    d.mkdir(exist_ok=True)
    order = np.random.default_rng(0).permutation(nz * nt)
    k = 0
    for z in range(nz):
        for t in range(nt):
            pix = np.full((rows, cols), 100 * z + 10 * t, np.uint16) + np.arange(rows, dtype=np.uint16)[:, None]
            _dicom(d / f"{order[k] + 1}.dcm", uid, z_mm=6.5 * z, frame=t, pixels=pix, instance=k + 1)
            k += 1
    return d, uid


def test_dicom_series_sorted_by_position_and_trigger_time(tmp_path):
    d, uid = _series(tmp_path)
    vol = read_dicom_series(d)
    assert vol.array.shape == (5, 6, 3, 4)  # (x = columns, y = rows, z, t)
    assert vol.array.dtype == np.float32
    for z in range(3):
        for t in range(4):
            np.testing.assert_array_equal(vol.array[0, :, z, t], 100 * z + 10 * t + np.arange(6))
    assert vol.spacing == pytest.approx((1.25, 1.5, 6.5))
    assert vol.meta["series_uid"] == uid
    # affine: voxel (x, y, z) -> RAS; LPS = IPP0 + x * 1.25 * ROW + y * 1.5 * COL + z * 6.5 * normal
    lps = np.array([0.0, 5.0, 7.0]) + 2 * 1.25 * ROW + 3 * 1.5 * COL + 2 * 6.5 * np.array([-1.0, 0, 0])
    ras = vol.affine @ np.array([2, 3, 2, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]))
    # file list mirrors the array order
    assert len(vol.meta["files"]) == 3 and len(vol.meta["files"][0]) == 4


def test_dicom_file_list_and_rescale(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    f = _dicom(d / "a.dcm", generate_uid(), 0.0, 0, np.full((4, 4), 3, np.uint16), slope=2.0)
    vol = read_dicom_series([f])
    assert vol.array.shape == (4, 4, 1, 1)
    np.testing.assert_allclose(vol.array, 16.0)  # 3 * 2 + 10


def test_dicom_several_series_listed_and_selectable(tmp_path):
    d, uid_a = _series(tmp_path, nz=2, nt=2)
    _dicom(d / "other.dcm", "1.2.3.4", 0.0, 0, np.zeros((6, 5), np.uint16))
    with pytest.raises(DataError, match="2 DICOM series.*1.2.3.4"):
        read_dicom_series(d)
    assert read_dicom_series(d, series_uid=uid_a).array.shape == (5, 6, 2, 2)
    assert read_dicom_series(d, series_uid="1.2.3.4").array.shape == (5, 6, 1, 1)
    with pytest.raises(DataError, match="9.9.9 not found"):
        read_dicom_series(d, series_uid="9.9.9")


def test_dicom_without_pixel_data(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _dicom(d / "nopix.dcm", generate_uid(), 0.0, 0, np.zeros((4, 4)), pixel_data=False)
    with pytest.raises(DataError, match="nopix.dcm.*no pixel data"):
        read_dicom_series(d)


def test_dicom_random_bytes_truncated_missing(tmp_path):
    d, _ = _series(tmp_path, nz=1, nt=2)
    junk = d / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(600))
    with pytest.raises(DataError, match="junk.dcm"):
        read_dicom_series(d)
    junk.unlink()
    good = sorted(d.glob("*.dcm"))[0]
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 20])  # pixel data cut short
    with pytest.raises(DataError, match=good.name):
        read_dicom_series(d)
    with pytest.raises(DataError, match="missing_dir.*not found"):
        read_dicom_series(tmp_path / "missing_dir")
    with pytest.raises(DataError, match="gone.dcm.*not found"):
        read_dicom_series([tmp_path / "gone.dcm"])
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_dir.*no DICOM"):
        read_dicom_series(empty)


def test_dicom_uneven_frames(tmp_path):
    d, uid = _series(tmp_path, nz=2, nt=2)
    _dicom(d / "extra.dcm", uid, 0.0, 5, np.zeros((6, 5), np.uint16))
    with pytest.raises(DataError, match="different numbers of frames"):
        read_dicom_series(d)



# ------------------------------------------------------------------------------------------------- bad-input fixes
def test_complex_nifti_is_refused_unless_allowed(tmp_path):
    """Casting complex to float32 would silently drop the imaginary part (segment / landmark / classify)."""
    import nibabel as nib

    arr = (np.ones((4, 4, 3)) + 1j * np.arange(48).reshape(4, 4, 3)).astype(np.complex64)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "c.nii.gz"))
    with pytest.raises(DataError, match=r"c.nii.gz: image holds complex values"):
        read_nifti(tmp_path / "c.nii.gz")
    vol = read_nifti(tmp_path / "c.nii.gz", allow_complex=True)
    assert vol.array.dtype == np.complex64
    np.testing.assert_array_equal(vol.array, arr)


def test_dicom_directory_skips_stray_non_dicom_files(tmp_path):
    d, _ = _series(tmp_path, nz=1, nt=2)
    (d / "README").write_text("exported by the scanner console\n")
    (d / "LOCKFILE").write_bytes(b"")  # empty and suffix-less: a stray too
    assert read_dicom_series(d).array.shape == (5, 6, 1, 2)
    (d / "broken.dcm").write_bytes(b"")  # an empty '.dcm' is a damaged image, not a stray
    with pytest.raises(DataError, match=r"broken.dcm: file is empty"):
        read_dicom_series(d)
    (d / "broken.dcm").unlink()
    with pytest.raises(DataError, match="README: not a DICOM file"):
        read_dicom_series([d / "README"])  # a file named explicitly is still an error
    only = tmp_path / "only"
    only.mkdir()
    (only / "README").write_text("x")
    (only / "NOTES").write_text("y")
    with pytest.raises(DataError, match="only: none of the 2 files is DICOM"):
        read_dicom_series(only)


def test_dicom_degenerate_orientation_is_named(tmp_path):
    import pydicom

    d, _ = _series(tmp_path, nz=2, nt=1)
    for f in sorted(d.glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        ds.ImageOrientationPatient = [0.0] * 6
        ds.save_as(str(f))
    with pytest.raises(DataError, match=r"ImageOrientationPatient \[0.0, 0.0, 0.0, 0.0, 0.0, 0.0\] is not two "
                                        "orthogonal unit vectors"):
        read_dicom_series(d)


def test_dicom_several_series_message_names_the_cli_option(tmp_path):
    from cinema_jax.infer.common import read_input

    d, uid_a = _series(tmp_path, nz=2, nt=2)
    _dicom(d / "other.dcm", "1.2.3.4", 0.0, 0, np.zeros((6, 5), np.uint16))
    with pytest.raises(DataError, match="choose one with --series-uid"):
        read_dicom_series(d)
    # the infer commands pass --series-uid through to the reader
    assert read_input(d, series_uid="1.2.3.4").array.shape == (5, 6, 1, 1)
    assert read_input(d, series_uid=uid_a).array.shape == (5, 6, 2, 2)


def test_nifti_zero_voxel_size_is_refused(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.diag([1.5, 1.5, 8.0, 1.0]))
    nib.save(img, str(tmp_path / "ok.nii.gz"))
    assert read_nifti(tmp_path / "ok.nii.gz").spacing == pytest.approx((1.5, 1.5, 8.0))
    nib.save(img, str(tmp_path / "zero.nii"))
    raw = bytearray((tmp_path / "zero.nii").read_bytes())
    raw[76 + 4 * 3:76 + 4 * 4] = np.float32(0.0).tobytes()  # pixdim[3] (header offset 76): nibabel reads it as 1
    (tmp_path / "zero.nii").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"zero.nii: NIfTI header voxel size pixdim\[1:4\] = \[1.5, 1.5, 0.0\]"):
        read_nifti(tmp_path / "zero.nii")
