"""Denoising inference on real Sunnybrook DICOM and on arrays; bad input -> one DataError, no partial output."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cinema_jax.fileutil import MARKER

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cinema_jax.errors import DataError  # noqa: E402
from cinema_jax.infer import denoise as infer  # noqa: E402


@pytest.fixture(scope="module")
def sunnybrook_slices(sunnybrook_dir, tmp_path_factory):
    """The two middle slices (all 20 frames) of the first Sunnybrook case as a DICOM directory, with the whole case's
    volume and the first slice's index. Same reader, slice loop and geometry path as the 12-slice case at 1/6 of the
    model time (the tiny model takes ~7 s per 256x256x20 slice on 2 CPU cores)."""
    from cinema_jax.data import io

    case = sorted(p for p in sunnybrook_dir.iterdir() if p.is_dir())[0] / "dicom"
    full = io.read_dicom_series(case)
    z0 = full.shape[2] // 2 - 1
    out = tmp_path_factory.mktemp("sunnybrook_dicom")
    for row in full.meta["files"][z0:z0 + 2]:
        for f in row:
            shutil.copy2(f, out / Path(f).name)
    return out, full, z0


def test_sunnybrook_dicom(sunnybrook_slices, bundle, tmp_path):
    case, full, z0 = sunnybrook_slices
    out = tmp_path / "out"
    s = infer.run("unused", case, out, model_bundle=bundle)
    assert {p.name for p in out.iterdir()} == {"denoised.nii.gz", "before_after.png", "frames.gif", "summary.json",
                                               MARKER}
    summ = json.loads((out / "summary.json").read_text())
    assert summ["noise_sigma"] > 0 and summ["format"] == "dicom"
    assert s["shape"] == [full.shape[0], full.shape[1], 2, full.shape[3]]
    from cinema_jax.data import io

    vol = io.read_nifti(out / "denoised.nii.gz")
    assert vol.array.shape == tuple(s["shape"]) and np.isfinite(vol.array).all() and vol.array.std() > 0
    # the NIfTI carries the DICOM geometry: same axes as the whole case, origin at the case's slice z0
    np.testing.assert_allclose(vol.affine[:3, :3], full.affine[:3, :3], atol=1e-3)
    np.testing.assert_allclose(vol.affine[:3, 3], (full.affine @ [0, 0, z0, 1])[:3], atol=1e-2)


def test_complex_npy_with_gmap(bundle, tmp_path):
    rng = np.random.default_rng(0)
    x = np.zeros((48, 40, 6), np.complex64)
    x[12:36, 10:30] = 50
    x += (rng.normal(size=x.shape) + 1j * rng.normal(size=x.shape)).astype(np.complex64) * 2
    np.save(tmp_path / "in.npy", x)
    np.save(tmp_path / "g.npy", np.full((48, 40), 1.5, np.float32))
    s = infer.run("unused", tmp_path / "in.npy", tmp_path / "o", gmap=tmp_path / "g.npy", model_bundle=bundle)
    y = np.load(tmp_path / "o" / "denoised.npy")
    assert y.shape == x.shape and np.iscomplexobj(y)
    assert s["noise_sigma"] == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("content", ["garbage", "nan", "1d"])
def test_bad_input_is_one_data_error_and_no_output(bundle, tmp_path, content):
    if content == "garbage":
        p = tmp_path / "bad.npy"
        p.write_bytes(b"not a numpy file")
    elif content == "nan":
        p = tmp_path / "bad.npy"
        np.save(p, np.full((16, 16, 4), np.nan, np.float32))
    else:
        p = tmp_path / "bad.npy"
        np.save(p, np.ones(10, np.float32))
    with pytest.raises(DataError):
        infer.run("unused", p, tmp_path / "out", model_bundle=bundle)
    assert not (tmp_path / "out").exists()
    assert [q.name for q in tmp_path.iterdir()] == ["bad.npy"]


def test_tiles_cover_and_blend_exactly(bundle):
    """Tiling arithmetic: with a model that returns its input, overlapping tiles blend back to the input exactly,
    on a series whose x/y are not tile multiples and whose T is shorter than the tile (padded)."""
    import flax.linen as nn

    class Echo(nn.Module):
        @nn.compact
        def __call__(self, image, train=False):
            return image[..., :2]

    _, _, c = bundle
    m = 16
    from cinema_jax.models.imaging_transformer import tile_starts

    assert tile_starts(50, 16, 4) == [0, 12, 24, 34]
    assert tile_starts(16, 16, 4) == [0]
    w = infer.blend_weights((8, 8, 4), (2, 2, 1))
    assert w.min() > 0 and w[3, 3, 1] == 1 and w[0, 0, 0] == pytest.approx((1 / 3) ** 2 * 0.5)
    rng = np.random.default_rng(0)
    series = (rng.standard_normal((2 * m + 5, 3 * m - 3, 5)) + 1j * rng.standard_normal((2 * m + 5, 3 * m - 3, 5)))
    gmap = np.ones(series.shape, np.float32)
    out = infer.denoise_array(Echo(), {}, c, series.astype(np.complex64), gmap, tile=(m, 2 * m, 8),
                              overlap=(m // 2, m // 2, 2), tile_batch=3)
    assert out.shape == series.shape
    np.testing.assert_allclose(out, series, atol=1e-5)


def test_one_tile_equals_whole_series(bundle):
    model, params, c = bundle
    m = 40  # not a multiple of the model's 32x32 build size: the model pads and tiles inside
    rng = np.random.default_rng(1)
    series = (rng.standard_normal((m, m, 4)) + 1j * rng.standard_normal((m, m, 4))).astype(np.complex64) * 3
    gmap = np.ones(series.shape, np.float32)
    whole = infer.denoise_array(model, params, c, series, gmap)
    tiled = infer.denoise_array(model, params, c, series, gmap, tile=(m, m, 4), overlap=(0, 0, 0), tile_batch=1)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    assert np.abs(whole - series).max() > 1e-2  # the model does change the input


def test_bad_tiling_is_a_config_error(bundle):
    from cinema_jax.errors import ConfigError

    model, params, c = bundle
    m = 32
    z = np.zeros((m, m, 4), np.complex64)
    with pytest.raises(ConfigError, match="triples"):
        infer.denoise_array(model, params, c, z, np.ones(z.shape, np.float32), tile=(m, m))
    with pytest.raises(ConfigError, match="overlap"):
        infer.denoise_array(model, params, c, z, np.ones(z.shape, np.float32), tile=(m, m, 4), overlap=(m, 0, 0))
    with pytest.raises(ConfigError, match="three"):
        infer._triple("64,64", "tile")
