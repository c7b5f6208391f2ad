"""Image headers that declare more data than their file holds (or than any scan has) are refused with one DataError
BEFORE anything is allocated: a 100-byte .nii.gz or a DICOM claiming 65535 x 65535 pixels must not reserve
gigabytes. The reads run in a subprocess whose address space is capped at its size after imports + 512 MiB, so an
early allocation shows up as a MemoryError instead of passing unnoticed (np.empty does not touch its pages)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import dicom_dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from cinema_jax.data import io
from cinema_jax.errors import DataError
from cinema_jax.infer.common import read_input

ROOT = Path(__file__).resolve().parents[2]
HEADROOM = 512 * 2**20

_READ_CAPPED = r"""
import json, resource, sys, time
from cinema_jax.errors import DataError
from cinema_jax.infer.common import read_input

vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[2]), vm + int(sys.argv[2])))
start = time.monotonic()
try:
    read_input(sys.argv[1])
    result = {"ok": True}
except DataError as e:
    result = {"ok": False, "error": str(e)}
result["seconds"] = time.monotonic() - start
print(json.dumps(result))
"""


def _read_capped(path) -> dict:
    """`read_input(path)` in a fresh process that cannot map more than HEADROOM beyond its imports."""
    proc = subprocess.run([sys.executable, "-c", _READ_CAPPED, str(path), str(HEADROOM)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a MemoryError escaping as a traceback lands here
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _refused(path, *words) -> str:
    res = _read_capped(path)
    assert not res["ok"], f"{path} was read"
    msg = res["error"]
    assert "\n" not in msg and Path(path).name in msg and "MemoryError" not in msg, msg
    assert res["seconds"] < 10, res
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------------------ NIfTI
def _header(shape, dtype=np.float32) -> bytes:
    """A NIfTI-1 single-file header (+ the 4 extension bytes) declaring `shape` voxels of `dtype` at offset 352."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms((1.0,) * len(shape))
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def test_a_tiny_gz_claiming_4096_cubed_voxels_is_refused(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_header((4096, 4096, 4096))))
    assert path.stat().st_size < 200
    _refused(path, "voxels")


def test_a_tiny_gz_claiming_1_gib_within_the_voxel_limit_is_refused(tmp_path):
    path = tmp_path / "short.nii.gz"  # 2**28 float32 voxels: under MAX_VOXELS, but 1 GiB cannot be in ~100 bytes
    path.write_bytes(gzip.compress(_header((1024, 1024, 256))))
    _refused(path, "declares")


def test_a_gz_whose_trailer_is_shorter_than_its_header_claims_is_refused(tmp_path):
    path = tmp_path / "cut.nii.gz"  # 64**3 float32 = 1 MiB declared, 100 kB of (incompressible) data present
    path.write_bytes(gzip.compress(_header((64, 64, 64)) + np.random.default_rng(0).bytes(100_000)))
    msg = _refused(path, "declares")
    assert str(352 + 64**3 * 4) in msg and str(352 + 100_000) in msg, msg


def test_uncompressed_nii_claims_are_checked_against_the_file_size(tmp_path):
    big = tmp_path / "big.nii"
    big.write_bytes(_header((4096, 4096, 4096)))
    _refused(big, "voxels")
    short = tmp_path / "short.nii"
    short.write_bytes(_header((512, 512, 256)) + b"\0" * 1000)
    _refused(short, "declares", str(352 + 1000))


def test_valid_multi_member_gzip_and_plain_files_still_read(tmp_path):
    """A gzip trailer only describes its last member: a valid file in several members must not be refused."""
    arr = np.random.default_rng(1).random((16, 12, 5)).astype(np.float32)
    plain = io.write_nifti(tmp_path / "a.nii", arr, spacing=(1.0, 1.5, 8.0))
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    for path in (plain, multi, io.write_nifti(tmp_path / "b.nii.gz", arr)):
        np.testing.assert_array_equal(io.read_nifti(path).array, arr, err_msg=path.name)
    assert _read_capped(multi)["ok"]


# ------------------------------------------------------------------------------------------------------------ DICOM
def _dicom(path, rows, cols, pixel_data: bytes, syntax=ExplicitVRLittleEndian, series=None, z=0.0, frame=0):
    ds = dicom_dataset(syntax)
    ds.SeriesInstanceUID = series or generate_uid()
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.PixelSpacing = [1.0, 1.0]
    ds.TriggerTime = 40.0 * frame
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixel_data
    if syntax.is_compressed:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_claiming_65535_squared_with_little_pixel_data_is_refused(tmp_path):
    path = _dicom(tmp_path / "huge.dcm", 65535, 65535, b"\0" * 32)
    _refused(path, "65535 x 65535", "MAX_VOXELS")
    d = tmp_path / "series"  # the same through a directory of such files (was a 3.44 TiB np.empty)
    d.mkdir()
    uid = generate_uid()
    for t in range(3):
        _dicom(d / f"{t}.dcm", 65535, 65535, b"\0" * 32, series=uid, frame=t)
    _refused(d / "0.dcm", "65535 x 65535")
    with pytest.raises(DataError, match="65535 x 65535"):
        read_input(d)
    _refused(_dicom(tmp_path / "wide.dcm", 16384, 16384, b"\0" * 32), "PixelData holds 32 bytes")  # under the limit


def test_a_short_uncompressed_pixel_data_is_refused_before_decoding(tmp_path):
    path = _dicom(tmp_path / "short.dcm", 4096, 4096, b"\0" * 64)
    with pytest.raises(DataError, match=r"short.dcm.*PixelData holds 64 bytes.*33554432") as e:
        io.read_dicom_series(path)
    assert "\n" not in str(e.value)


def test_compressed_dicom_is_held_to_the_voxel_limit(tmp_path):
    path = _dicom(tmp_path / "rle.dcm", 65535, 65535, encapsulate([b"\0" * 64]), syntax=RLELossless)
    _refused(path, "pixels", str(io.MAX_VOXELS))


def test_a_series_over_the_voxel_limit_is_refused_before_allocating(tmp_path, monkeypatch):
    d = tmp_path / "s"
    d.mkdir()
    uid = generate_uid()
    for z in range(3):
        for t in range(4):
            _dicom(d / f"{z}_{t}.dcm", 6, 5, np.zeros((6, 5), np.uint16).tobytes(), series=uid, z=6.5 * z, frame=t)
    assert io.read_dicom_series(d).array.shape == (5, 6, 3, 4)
    monkeypatch.setattr(io, "MAX_VOXELS", 6 * 5 * 12 - 1)
    with pytest.raises(DataError, match=r"5 x 6 x 3 x 4 = 360 voxels") as e:
        io.read_dicom_series(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)
