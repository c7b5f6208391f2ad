"""`cinema-jax infer`: NIfTI and DICOM (Sunnybrook) inputs give masks in the input geometry, pictures and a JSON
summary; bad input (corrupt file, wrong dims, no heart-sized content, checkpoint/task mismatch) exits 2 and leaves
no output behind.

Checkpoints are saved straight from initialised params (no training): the segmentation head's bias is set so every
pixel is LV, which exercises the whole pipeline deterministically."""

import json

import jax
import nibabel as nib
import numpy as np
import pytest

from cinema_jax.cli import main as cli
from cinema_jax.config import load_config


def _save(task_name, cfg_spec, directory, lv_bias=False, overrides=()):
    import flax.linen as nn

    from cinema_jax.tasks import get_task
    from cinema_jax.train.checkpoint import save_params

    config = load_config(cfg_spec, list(overrides))
    task = get_task(task_name)
    model = task.make_model(config)
    ex = task.example_batch(config, 1)
    params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, **task.model_inputs(ex), train=False)["params"])
    params = jax.tree_util.tree_map(np.asarray, params)
    if lv_bias:
        for k in params:
            if k.startswith("pred_head"):
                params[k]["bias"] = np.array([0.0, 0.0, 0.0, 5.0], np.float32)
    save_params(directory, params, config)
    return directory


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"segment": _save("segment", "configs/finetune_seg.py:smoke", root / "seg", lv_bias=True),
            "landmark": _save("landmark", "configs/finetune_landmark.py:smoke", root / "lm"),
            "classify": _save("classify", "configs/finetune_cls.py:smoke", root / "cls")}


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    from cinema_jax.data import io, phantom

    root = tmp_path_factory.mktemp("inputs")
    cfg = phantom.PhantomConfig(sax_size=(48, 48), n_slices=10, sax_spacing=(4.0, 4.0, 10.0), lax_size=(48, 48),
                                lax_spacing=(4.5, 4.5), n_frames=4)
    r = phantom.render(phantom.sample_subject(1, 2, cfg), None, ("sax", "lax_4c"), cfg)
    aff = np.diag([4.0, 4.0, 10.0, 1.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    io.write_nifti(root / "sax_t.nii.gz", np.moveaxis(r["sax"], 0, -1) * 800, affine=aff)
    io.write_nifti(root / "sax_ed.nii.gz", r["sax"][0] * 800, affine=aff)
    io.write_nifti(root / "lax_t.nii.gz", np.moveaxis(r["lax_4c"], 0, -1) * 800, spacing=(4.5, 4.5, 1.0))
    return root


def test_segment_nifti_cine(ckpts, cine, tmp_path):
    out = tmp_path / "seg"
    assert cli(["infer", "segment", "--ckpt", str(ckpts["segment"]), "--input", str(cine / "sax_t.nii.gz"),
                "--output", str(out)]) == 0
    for name in ("mask.nii.gz", "overlay.png", "cine.gif", "volumes.png", "volumes.csv", "summary.json"):
        assert (out / name).is_file(), name
    src = nib.load(str(cine / "sax_t.nii.gz"))
    mask = nib.load(str(out / "mask.nii.gz"))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_frames"] == 4 and len(summary["curves"]["lv"]) == 4
    assert {"lv_edv", "lv_esv", "lv_ef", "ed_frame", "es_frame"} <= set(summary)
    # single 3-D frame -> 3-D mask in the same geometry (`infer ef` refuses it: no EF without a cine)
    out3 = tmp_path / "seg3"
    assert cli(["infer", "segment", "--ckpt", str(ckpts["segment"]), "--input", str(cine / "sax_ed.nii.gz"),
                "--output", str(out3)]) == 0
    assert nib.load(str(out3 / "mask.nii.gz")).shape == (48, 48, 10)


def test_segment_sunnybrook_dicom(ckpts, sunnybrook_dir, tmp_path):
    subject = sorted(p for p in sunnybrook_dir.iterdir() if (p / "dicom").is_dir())[0]
    out = tmp_path / "sb"
    assert cli(["infer", "segment", "--ckpt", str(ckpts["segment"]), "--input", str(subject / "dicom"),
                "--output", str(out)]) == 0
    from cinema_jax.data.io import read_dicom_series

    vol = read_dicom_series(subject / "dicom")
    assert nib.load(str(out / "mask.nii.gz")).shape == vol.array.shape
    assert json.loads((out / "summary.json").read_text())["n_frames"] == vol.array.shape[3]


def test_landmark_and_classify(ckpts, cine, tmp_path):
    out = tmp_path / "lm"
    assert cli(["infer", "landmark", "--ckpt", str(ckpts["landmark"]), "--input", str(cine / "lax_t.nii.gz"),
                "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["long_axis_length_mm"]) == 4 and "gls_percent" in s and "mapse_mm" in s
    assert len((out / "landmarks.csv").read_text().splitlines()) == 5
    out = tmp_path / "cls"
    assert cli(["infer", "classify", "--ckpt", str(ckpts["classify"]), "--input", str(cine / "sax_t.nii.gz"),
                "--output", str(out), "--ed-frame", "0", "--es-frame", "2"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert abs(sum(s["probabilities"].values()) - 1) < 1e-3


def _bad(args, out, capsys, match):
    assert cli(args + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_inputs_exit_2_without_output(ckpts, cine, tmp_path, capsys):
    seg = ["infer", "segment", "--ckpt", str(ckpts["segment"]), "--input"]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08not a nifti at all")
    _bad(seg + [str(corrupt)], tmp_path / "o1", capsys, "corrupt.nii.gz")
    from cinema_jax.data import io

    io.write_nifti(tmp_path / "flat.nii.gz", np.ones((48, 48), np.float32), spacing=(4.0, 4.0))
    _bad(seg + [str(tmp_path / "flat.nii.gz")], tmp_path / "o2", capsys, "(x, y, z)")
    io.write_nifti(tmp_path / "tiny.nii.gz", np.random.default_rng(0).random((12, 12, 4)).astype(np.float32),
                   spacing=(1.0, 1.0, 10.0))
    _bad(seg + [str(tmp_path / "tiny.nii.gz")], tmp_path / "o3", capsys, "too small to hold a heart")
    _bad(["infer", "segment", "--ckpt", str(ckpts["classify"]), "--input", str(cine / "sax_t.nii.gz")],
         tmp_path / "o4", capsys, "task 'classify'")
    _bad(["infer", "classify", "--ckpt", str(ckpts["classify"]), "--input", str(cine / "sax_t.nii.gz")],
         tmp_path / "o5", capsys, "--es-frame")
    # config edited after training -> parameters no longer fit
    cfg_path = ckpts["segment"] / "config.json"
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(ckpts["segment"], broken)
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["dec_chans"] = [4, 8, 8, 16, 32]
    (broken / "config.json").write_text(json.dumps(cfg))
    _bad(["infer", "segment", "--ckpt", str(broken), "--input", str(cine / "sax_t.nii.gz")], tmp_path / "o6",
         capsys, "do not match")
    _bad(["infer", "segment", "--ckpt", str(tmp_path / "nope"), "--input", str(cine / "sax_t.nii.gz")],
         tmp_path / "o7", capsys, "does not exist")
