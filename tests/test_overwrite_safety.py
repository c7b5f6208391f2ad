"""Never delete what the tool did not write (issue 21, class 1).

Before: `--overwrite` removed the target folder wholesale, so pointed at the input DICOM folder, the folder holding the
input NIfTI, the `--ckpt` run or the folder holding `convert import`'s source, it deleted them with exit code 0;
`convert export` replaced an existing file silently; `train --workdir` on an ordinary folder rewrote its config.json,
truncated its metrics.jsonl and replaced its pictures. Now an overwrite replaces only an output cinema-jax wrote (its
marker lists every entry), a target that is, contains or lies inside an input or checkpoint is refused, and files of
someone else's are never touched."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import seg_checkpoint

from cinema_jax.cli import main as cli
from cinema_jax.errors import CinemaError
from cinema_jax.fileutil import MARKER, atomic_dir, check_output_dir, read_marker


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, argv, *needles):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------------------------ the rule itself
def test_atomic_dir_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert read_marker(out)["entries"] == ["a.txt"]
    with atomic_dir(out, overwrite=True) as tmp:  # ours: replaced
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(CinemaError, match="'notes.txt', which cinema-jax did not write"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "c.txt").write_text("3")
    assert (out / "notes.txt").read_text() == "the user's" and (out / "b.txt").is_file()

    user = tmp_path / "user"
    user.mkdir()
    (user / "scan.dcm").write_bytes(b"x")
    with pytest.raises(CinemaError, match="was not written by cinema-jax"):
        with atomic_dir(user, overwrite=True):
            pass
    assert (user / "scan.dcm").read_bytes() == b"x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_output_never_is_contains_or_lies_inside_a_source(tmp_path):
    scans = tmp_path / "scans"
    (scans / "series").mkdir(parents=True)
    f = scans / "case.nii.gz"
    f.write_bytes(b"x")
    for out, what in ((scans, "contains the input"), (scans / "series", "is the input"),
                      (scans / "series" / "out", "lies inside the input")):
        with pytest.raises(CinemaError, match=what):
            check_output_dir(out, overwrite=True, sources=(f, scans / "series"))
    check_output_dir(tmp_path / "elsewhere", overwrite=True, sources=(f, scans / "series"))


# ------------------------------------------------------------------------------------------------ through the CLI
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cinema_jax.data import io, phantom

    root = tmp_path_factory.mktemp("overwrite")
    ckpt = seg_checkpoint(root / "run" / "best")
    cfg = phantom.PhantomConfig(sax_size=(48, 48), n_slices=6, sax_spacing=(4.0, 4.0, 10.0), n_frames=2)
    r = phantom.render(phantom.sample_subject(1, 2, cfg), None, ("sax",), cfg)
    scans = root / "scans"
    io.write_nifti(scans / "case.nii.gz", np.moveaxis(r["sax"], 0, -1) * 800, spacing=(4.0, 4.0, 10.0))
    (scans / "notes.txt").write_text("the user's notes")
    return root, ckpt.parent, scans


@pytest.mark.parametrize("target", ["scans", "run", "run_best", "run_inside"])
def test_infer_overwrite_never_deletes_inputs_or_the_checkpoint(setup, capsys, target):
    root, run, scans = setup
    out = {"scans": scans, "run": run, "run_best": run / "best", "run_inside": run / "infer"}[target]
    before_scans, before_run = _snapshot(scans), _snapshot(run)
    _refused(capsys, ["infer", "segment", "--ckpt", str(run), "--input", str(scans / "case.nii.gz"),
                      "--output", str(out), "--overwrite"], "choose another output")
    assert _snapshot(scans) == before_scans and _snapshot(run) == before_run
    assert not (run / "infer").exists()


def test_infer_overwrite_replaces_its_own_output_only(setup, capsys, tmp_path):
    _, run, scans = setup
    out = tmp_path / "seg"
    argv = ["infer", "segment", "--ckpt", str(run), "--input", str(scans / "case.nii.gz"), "--output", str(out)]
    assert cli(argv) == 0
    assert read_marker(out)["kind"] == "output" and (out / "mask.nii.gz").is_file()
    _refused(capsys, argv, "pass --overwrite")
    assert cli(argv + ["--overwrite"]) == 0
    (out / "my_measurements.csv").write_text("lv,1\n")
    _refused(capsys, argv + ["--overwrite"], "my_measurements.csv", "never deletes")
    assert (out / "my_measurements.csv").read_text() == "lv,1\n" and (out / "mask.nii.gz").is_file()

    user = tmp_path / "user_folder"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    _refused(capsys, argv[:-1] + [str(user), "--overwrite"], "not written by cinema-jax")
    assert (user / "thesis.tex").read_text() == "x"


def test_infer_output_inside_a_dicom_input_is_refused(sunnybrook_dir, setup, capsys, tmp_path):
    _, run, _ = setup
    series = tmp_path / "dicom"
    src = next(p for p in sorted(sunnybrook_dir.rglob("*")) if p.is_dir() and any(p.glob("*.dcm")))
    shutil.copytree(src, series)
    before = _snapshot(series)
    for out in (series, series / "seg"):
        _refused(capsys, ["infer", "segment", "--ckpt", str(run), "--input", str(series), "--output", str(out),
                          "--overwrite"], "input")
    assert _snapshot(series) == before


def test_convert_import_never_deletes_its_source_and_export_never_replaces_silently(setup, capsys, tmp_path):
    _, run, _ = setup
    exported = tmp_path / "weights" / "seg.safetensors"
    assert cli(["convert", "export", str(run), str(exported)]) == 0
    (tmp_path / "weights" / "README").write_text("where these came from")
    before = _snapshot(tmp_path / "weights")
    _refused(capsys, ["convert", "export", str(run), str(exported)], "already exists", "--overwrite")
    assert _snapshot(tmp_path / "weights") == before
    assert cli(["convert", "export", str(run), str(exported), "--overwrite"]) == 0
    _refused(capsys, ["convert", "export", str(run), str(run / "best" / "x.safetensors")], "lies inside the input")

    imp = ["convert", "import", str(exported), "--kind", "convunetr", "--size", "tiny"]
    _refused(capsys, imp[:3] + [str(tmp_path / "weights")] + imp[3:] + ["--overwrite"], "contains the input")
    assert _snapshot(tmp_path / "weights") == before | {"seg.safetensors": exported.read_bytes()}


def test_train_refuses_an_ordinary_folder(capsys, tmp_path):
    folder = tmp_path / "results"
    (folder / "images").mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": 1}')
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n' * 30)
    (folder / "images" / "step_0000001.png").write_bytes(b"png")
    (folder / "paper.pdf").write_bytes(b"pdf")
    before = _snapshot(folder)
    _refused(capsys, ["train", "--config=tests/train/toy_config.py", f"--workdir={folder}"],
             "not a cinema-jax run", "paper.pdf")
    assert _snapshot(folder) == before and not (folder / MARKER).exists()


def test_train_resumes_a_run_written_before_markers(tmp_path):
    """A run of an earlier version (no marker, only run entries) is still ours: it resumes and gets marked."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from train_toy_task import toy_config

    from cinema_jax.train.loop import train

    run = tmp_path / "run"
    train(toy_config({"total_steps": 4}), run)
    (run / MARKER).unlink()
    best = run / "best"
    if best.exists():
        (best / MARKER).unlink()
    out = train(toy_config({"total_steps": 6}), run)
    assert out["step"] == 6 and read_marker(run)["kind"] == "run"
    assert json.loads((run / "config.json").read_text())["total_steps"] == 6
