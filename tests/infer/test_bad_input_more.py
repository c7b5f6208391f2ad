"""More `cinema-jax infer` bad input: EF without a cine, ignored or equal ED/ES frames, complex NIfTI, an output
directory refused only after the model ran, denoise with the wrong checkpoint, constant or noise-free images and
non-strict summary JSON. Each is one CinemaError (CLI: exit 2, one line) with no output left behind.

Checkpoints are saved straight from initialised params (no training), as in test_infer.py."""

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cinema_jax.cli import main as cli  # noqa: E402
from cinema_jax.errors import CheckpointError, DataError  # noqa: E402
from cinema_jax.infer import common  # noqa: E402
from cinema_jax.infer import denoise as den  # noqa: E402


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory):
    """A segmentation smoke run whose head calls every pixel LV (constant volume curves)."""
    from helpers import seg_checkpoint

    return seg_checkpoint(tmp_path_factory.mktemp("seg") / "seg")


@pytest.fixture(scope="module")
def sax(tmp_path_factory):
    """A 4-frame SAX cine (48 x 48 x 8 at 4 mm) and its first frame alone."""
    from cinema_jax.data import io, phantom

    root = tmp_path_factory.mktemp("inputs")
    cfg = phantom.PhantomConfig(sax_size=(48, 48), n_slices=8, sax_spacing=(4.0, 4.0, 10.0), n_frames=4)
    r = phantom.render(phantom.sample_subject(1, 2, cfg), None, ("sax",), cfg)
    io.write_nifti(root / "sax_t.nii.gz", np.moveaxis(r["sax"], 0, -1) * 800, spacing=(4.0, 4.0, 10.0))
    io.write_nifti(root / "sax_ed.nii.gz", r["sax"][0] * 800, spacing=(4.0, 4.0, 10.0))
    return root


def _bad(args, out, capsys, match):
    assert cli(args + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_output_dir_is_checked_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    missing = str(tmp_path / "no_such_run")  # loading it would fail: the output check must come first
    for what in ("segment", "landmark", "classify", "ef", "denoise"):
        assert cli(["infer", what, "--ckpt", missing, "--input", "in.nii.gz", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "already exists and is not empty" in err and err.count("\n") == 1, (what, err)
    assert (out / "keep.txt").read_text() == "x"


def test_pick_frames_refuses_equal_ed_and_es():
    cine = np.zeros((4, 4, 2, 5))
    assert common.pick_frames(cine, 3, 0, "in") == (3, 0)
    with pytest.raises(DataError, match="--ed-frame and --es-frame are both 1; ED and ES must be different"):
        common.pick_frames(cine, 1, 1, "in")


def test_ef_needs_a_cine_and_uses_the_given_frames(seg_ckpt, sax, tmp_path, capsys):
    ef = ["infer", "ef", "--ckpt", str(seg_ckpt), "--input"]
    _bad(ef + [str(sax / "sax_ed.nii.gz")], tmp_path / "o1", capsys, "EF needs a cine with >= 2 frames")
    _bad(ef + [str(sax / "sax_t.nii.gz"), "--ed-frame", "1", "--es-frame", "1"], tmp_path / "o2", capsys,
         "ED and ES must be different frames")
    out = tmp_path / "ef"
    assert cli(ef + [str(sax / "sax_t.nii.gz"), "--ed-frame", "3", "--es-frame", "0", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["ed_frame"], s["es_frame"]) == (3, 0)  # were ignored: max / min LV volume frames (0, 0) instead
    assert s["lv_edv"] == pytest.approx(s["curves"]["lv"][3], abs=1e-3)
    assert s["lv_esv"] == pytest.approx(s["curves"]["lv"][0], abs=1e-3)


def test_swapped_ed_es_frames_are_flagged(capsys):
    from cinema_jax.infer.segment import _measures_at

    curves = {"lv": np.array([120.0, 90.0, 50.0, 80.0]), "rv": np.array([130.0, 100.0, 60.0, 90.0])}
    ok = _measures_at(curves, 0, 2)
    assert ok["lv_ef"] == pytest.approx(100 * 70 / 120) and "warning" not in ok
    swapped = _measures_at(curves, 2, 0)
    assert swapped["lv_ef"] < 0 and "look swapped" in swapped["warning"] and "peaks at frame 0" in swapped["warning"]
    assert "warning: LV volume at ES (frame 0)" in capsys.readouterr().err


def test_complex_nifti_is_refused_for_segmentation(seg_ckpt, tmp_path, capsys):
    arr = (np.random.default_rng(0).random((48, 48, 8)) * (1 + 1j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(arr, np.diag([4.0, 4.0, 10.0, 1.0])), str(tmp_path / "c.nii.gz"))
    _bad(["infer", "segment", "--ckpt", str(seg_ckpt), "--input", str(tmp_path / "c.nii.gz")], tmp_path / "o",
         capsys, "image holds complex values")


def test_denoise_loads_only_fitting_denoise_checkpoints(seg_ckpt, bundle, tmp_path):
    from cinema_jax.train.checkpoint import save_params

    with pytest.raises(CheckpointError, match="trained for task 'segment'"):
        den._load_model(seg_ckpt)
    save_params(tmp_path / "nocfg", {"w": np.zeros(2, np.float32)}, None)
    with pytest.raises(CheckpointError, match="no config.json naming the task"):
        den._load_model(tmp_path / "nocfg")
    _, params, c = bundle
    save_params(tmp_path / "den", params, c)
    shutil.copytree(tmp_path / "den", tmp_path / "wide")
    cfg = json.loads((tmp_path / "wide" / "config.json").read_text())
    cfg["model"]["width"] = 16  # the tiny model is 8 wide
    (tmp_path / "wide" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="parameters do not match the model in its config"):
        den._load_model(tmp_path / "wide")
    _, loaded, _ = den._load_model(tmp_path / "den")
    assert set(flatten_dict(loaded)) == set(flatten_dict(params))


@pytest.mark.parametrize("content, match", [("zeros", "image is constant"), ("ones", "image is constant"),
                                            ("noise_free", "could not estimate the noise level")])
def test_denoise_refuses_images_without_measurable_noise(bundle, tmp_path, content, match):
    x = {"zeros": np.zeros((32, 32, 4)), "ones": np.ones((32, 32, 4))}.get(content)
    if x is None:  # a clean square on an exactly zero background: the estimator's 1e-6 floor
        x = np.zeros((32, 32, 4))
        x[8:24, 8:24] = 100.0
    np.save(tmp_path / "in.npy", x.astype(np.float32))
    with pytest.raises(DataError, match=match):
        den.run("unused", tmp_path / "in.npy", tmp_path / "out", model_bundle=bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]


def test_denoise_complex_nifti_stays_complex_and_summary_is_strict_json(bundle, tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(32, 32, 4)) + 1j * rng.normal(size=(32, 32, 4))) * 2.0
    x[:, :18] = rng.choice([100, -100, 100j, -100j], size=(32, 18, 4))  # > 25 % of pixels at magnitude 100
    nib.save(nib.Nifti1Image(x.astype(np.complex64), np.eye(4)), str(tmp_path / "c.nii.gz"))
    s = den.run("unused", tmp_path / "c.nii.gz", tmp_path / "out", model_bundle=bundle)
    assert s["complex_input"] is True
    y = np.asanyarray(nib.load(str(tmp_path / "out" / "denoised.nii.gz")).dataobj)
    assert y.shape == x.shape and np.iscomplexobj(y)  # the imaginary part used to be dropped on read
    text = (tmp_path / "out" / "summary.json").read_text()

    def refuse(const):
        raise ValueError(f"non-standard JSON constant {const}")

    summary = json.loads(text, parse_constant=refuse)
    assert summary["median_snr_input"] is None  # was NaN ('Mean of empty slice')
