"""`cinema-jax train` contract: bad config input -> one line on stderr, exit code 2, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    env = dict(os.environ, CINEMA_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "cinema_jax", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args, match", [
    (["--config.nope=1"], "unknown config key 'nope'"),
    (["--config.total_steps=x"], "expected an integer"),
    (["--config.mesh.data=3"], "needs 3 devices"),
    (["--config.data.source=arrayrecord"], "data.path is required for data.source='arrayrecord'"),
])
def test_train_config_errors_are_one_line(tmp_path, args, match):
    out = run_cli("train", "--config=configs/mae_pretrain.py:smoke", f"--workdir={tmp_path}", *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_data_synth_writes_a_cine_dataset(tmp_path):
    out = run_cli("data", "synth", "--out", str(tmp_path / "ds"), "--n-subjects", "2", "--cine")
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "ds" / "info.json").read_text())
    assert info["cine"] is True and info["splits"] == {"train": 1, "val": 1} and "sax_t" in info["keys"]


def test_data_pack_a_cine_layout(tmp_path):
    nib = pytest.importorskip("nibabel")
    import numpy as np

    (tmp_path / "layout" / "train" / "p1").mkdir(parents=True)
    (tmp_path / "layout" / "train_metadata.csv").write_text("pid\np1\n")
    cine = np.random.default_rng(0).integers(0, 256, (16, 16, 3, 5)).astype(np.uint8)
    nib.save(nib.Nifti1Image(cine, np.eye(4)), tmp_path / "layout" / "train" / "p1" / "p1_sax_t.nii.gz")
    out = run_cli("data", "pack", str(tmp_path / "layout"), str(tmp_path / "packed"), "--views", "sax",
                  "--cine-only")
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "packed" / "info.json").read_text())
    assert info["splits"] == {"train": 1} and info["cine"] and not info["edes"]
    assert (tmp_path / "packed" / "train.frames.array_record").is_file()
    again = run_cli("data", "pack", str(tmp_path / "layout"), str(tmp_path / "packed2"), "--views", "sax")
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "p1_sax_ed.nii.gz: file not found" in again.stderr
    assert not (tmp_path / "packed2").exists()


def test_missing_config_file(tmp_path):
    out = run_cli("train", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert out.returncode == 2 and out.stderr.strip() == "error: config file not found: configs/nope.py"


def test_eval_of_empty_workdir(tmp_path):
    out = run_cli("eval", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "holds no checkpoint" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_train_contract_smoke(tmp_path):
    """The external contract: smoke MAE with the documented flags writes one metrics line per logged step."""
    out = run_cli("train", "--config=configs/mae_pretrain.py:smoke", f"--workdir={tmp_path}",
                  "--config.total_steps=4", "--config.seed=3", "--config.log_every=2", "--config.checkpoint_every=2",
                  "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                  "--config.eval_every=0", "--config.image_every=0")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all("loss" in r and "sax_loss" in r and "lr" in r and "grad_norm" in r for r in rows)
    assert (tmp_path / "checkpoints" / "4" / "state").is_dir()


def test_data_pack_with_no_views_is_refused(tmp_path, capsys):
    """`--views ,` used to pack records without images (rc 0)."""
    from cinema_jax.cli import main

    (tmp_path / "layout").mkdir()
    assert main(["data", "pack", str(tmp_path / "layout"), str(tmp_path / "packed"), "--views", ",",
                 "--no-cine"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no views to pack") and err.count("\n") == 1, err
    assert not (tmp_path / "packed").exists()


def test_multi_line_errors_print_one_line(capsys):
    from cinema_jax import cli
    from cinema_jax.errors import DataError

    def boom(argv):
        raise DataError("cannot parse:\n  line 1\n\t^ here\n")

    cli.COMMANDS["boom"] = boom
    try:
        assert cli.main(["boom"]) == 2
    finally:
        del cli.COMMANDS["boom"]
    assert capsys.readouterr().err == "error: cannot parse: line 1 ^ here\n"
