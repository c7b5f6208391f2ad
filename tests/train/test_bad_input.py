"""Bad user input to training, eval, checkpoints and output paths: one CinemaError line (exit 2), no traceback,
nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_toy_task import ToyTask, toy_config

from cinema_jax.config import load_config
from cinema_jax.errors import CheckpointError, CinemaError, ConfigError
from cinema_jax.fileutil import atomic_dir, atomic_path, write_json_atomic, write_text_atomic
from cinema_jax.tasks import register_task
from cinema_jax.train import checkpoint as ckpt
from cinema_jax.train.loop import evaluate_workdir, train

ROOT = Path(__file__).resolve().parents[2]
MAE = str(ROOT / "configs" / "mae_pretrain.py") + ":smoke"


def run_cli(*args, timeout=300):
    env = dict(os.environ, CINEMA_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "cinema_jax", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ output paths
def test_atomic_dir_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "out").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(CinemaError, match="is an existing file"):
            with atomic_dir(tmp_path / "out", overwrite=overwrite):
                pass
    assert (tmp_path / "out").read_text() == "x"
    with pytest.raises(CinemaError, match=r"out is a file, not a directory"):
        with atomic_dir(tmp_path / "out" / "sub"):
            pass
    with pytest.raises(CinemaError, match=r"out is a file, not a directory"):
        with atomic_dir(tmp_path / "out" / "a" / "b"):
            pass
    assert leftovers(tmp_path) == []


def test_atomic_path_refuses_a_directory_or_a_file_parent(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CinemaError, match="is an existing directory"):
        write_text_atomic(tmp_path / "d", "x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CinemaError, match=r"f is a file, not a directory"):
        with atomic_path(tmp_path / "f" / "out.png"):
            pass
    assert (tmp_path / "d").is_dir() and leftovers(tmp_path) == [] and leftovers(tmp_path / "d") == []


def test_json_outputs_are_strict(tmp_path):
    """An undefined metric (NaN/Inf) is written as null, never as a NaN token other JSON readers reject."""
    import json

    write_json_atomic(tmp_path / "m.json", {"ef": float("nan"), "x": np.float32(1.5), "n": np.int64(3),
                                            "a": np.array([1.0, np.inf]), "ok": np.bool_(True), "t": (2, None)})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ef": None, "x": 1.5, "n": 3, "a": [1.0, None], "ok": True, "t": [2, None]}


def test_train_workdir_that_is_a_file(tmp_path):
    (tmp_path / "wd").write_text("x")
    for workdir in (tmp_path / "wd", tmp_path / "wd" / "run"):
        with pytest.raises(CinemaError, match=r"wd is a file, not a directory"):
            train(toy_config({"total_steps": 2}), workdir)


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("override, match", [
    ("optim.lr=-1", "'optim.lr' must be >= 0"),
    ("optim.lr=nan", "'optim.lr' must be finite"),
    ("optim.lr=inf", "'optim.lr' must be finite"),
    ("optim.min_lr=-1e-3", "'optim.min_lr' must be >= 0"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be >= 0"),
    ("optim.clip_norm=nan", "'optim.clip_norm' must be finite"),
    ("optim.b2=1.0", r"'optim.b2' must be in \[0, 1\)"),
    ("optim.warmup_steps=-5", "'optim.warmup_steps' must be >= 0"),
    ("optim.schedule=linear", "cosine or constant"),
    ("data.views=sax,bogus", "unknown view 'bogus'"),
    ("data.views=sax,sax", "repeats a view"),
])
def test_bad_values_fail_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(MAE, [override])


@pytest.mark.parametrize("override, match", [
    ("model.size=bogus", "does not build the model: ValueError: model size must be one of"),
    ("model.mask_ratio=1.5", "does not build the initial state: ValueError: mask ratio must be in"),
    ("data.sax_size=31,31,4", "ValueError: image size .* is not divisible by patch size"),
])
def test_config_the_model_refuses_is_a_config_error(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        train(load_config(MAE, ["total_steps=2", override]), tmp_path / "run")


def test_library_train_validates_the_config(tmp_path):
    cfg = toy_config({"total_steps": 2})
    cfg.optim.lr = float("nan")
    with pytest.raises(ConfigError, match="'optim.lr' must be finite"):
        train(cfg, tmp_path / "run")


class BadSourceToyTask(ToyTask):
    name = "toy_bad_source"

    def source(self, config, split):
        raise ValueError("cannot reshape array of size 7 into shape (3,)")


register_task(BadSourceToyTask())


def test_a_pipeline_build_error_blames_config_and_data(tmp_path):
    cfg = toy_config({"total_steps": 2})
    cfg.task = "toy_bad_source"
    with pytest.raises(ConfigError, match=r"^the data pipeline could not be built from the config and the data it "
                                          r"names: ValueError: cannot reshape"):
        train(cfg, tmp_path / "run")


# ------------------------------------------------------------------------------------------------ workdirs
class OtherToyTask(ToyTask):
    name = "toy_other"


register_task(OtherToyTask())


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 4-step toy run with best/ (copied by tests that change it)."""
    workdir = tmp_path_factory.mktemp("toy") / "run"
    train(toy_config({"total_steps": 4, "eval_every": 4}), workdir)
    return workdir


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_another_task_does_not_take_over_a_run(tmp_path, toy_run):
    run = copy_run(toy_run, tmp_path / "run")
    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match="holds a 'toy_regress' run; task 'toy_other' cannot resume it"):
        train(toy_config({"task": "toy_other", "total_steps": 8}), run)
    assert (run / "config.json").read_text() == before


def test_failed_resume_keeps_the_runs_config(tmp_path, toy_run):
    run = copy_run(toy_run, tmp_path / "run")
    before = (run / "config.json").read_text()
    with pytest.raises(CheckpointError, match="cannot resume") as err:
        train(toy_config({"total_steps": 8, "model.width": 32}), run)
    msg = str(err.value)
    assert "\n" not in msg and ": (different" not in msg  # Orbax's detail kept, on the one line
    assert (run / "config.json").read_text() == before
    evaluate_workdir(run, "val")  # still evaluates with the config its params were trained with


def test_eval_params_that_do_not_fit_the_config(tmp_path, toy_run):
    run = copy_run(toy_run, tmp_path / "run")
    for name in ("config.json", "best/config.json"):
        cfg = json.loads((run / name).read_text())
        cfg["model"]["width"] = 32
        (run / name).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"parameters do not match the model in its config \(encoder/"):
        evaluate_workdir(run)


def test_eval_config_json_missing_or_not_an_object(tmp_path, toy_run):
    run = copy_run(toy_run, tmp_path / "run")
    for name in ("config.json", "best/config.json"):
        (run / name).unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        evaluate_workdir(run)
    params, config = ckpt.load_params(run / "checkpoints" / "4")  # params alone stay loadable (init_from, export)
    assert "encoder" in params and "task" not in config
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json is not a JSON object"):
        evaluate_workdir(run)


# ------------------------------------------------------------------------------------------------ broken checkpoints
def small_export(path, n=4):
    rng = np.random.default_rng(0)
    params = {f"layer_{i}": {"kernel": rng.normal(size=(32, 32)).astype(np.float32)} for i in range(n)}
    ckpt.save_params(path, params, {"task": "toy_regress"})
    return path


def test_params_without_orbax_metadata(tmp_path):
    exp = small_export(tmp_path / "exp")
    (exp / "params" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        ckpt.load_params(exp)


LOAD_5_TIMES = """
import sys
from cinema_jax.errors import CinemaError
from cinema_jax.train import checkpoint as ckpt
for _ in range(5):  # each failed restore used to leave reads behind that printed onto a closed event loop
    try:
        ckpt.load_params(sys.argv[1])
    except CinemaError as e:
        err = e
print(f"error: {err}", file=sys.stderr)
raise SystemExit(2)
"""


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_fails_cleanly(tmp_path, damage):
    exp = small_export(tmp_path / "exp", n=48)  # many arrays: many reads in flight when the bad one fails
    data = max((p for p in (exp / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 4] + bytes(b ^ 0xFF for b in raw[len(raw) // 4:]) if damage == "flip"
                     else raw[: len(raw) // 3])
    out = subprocess.run([sys.executable, "-c", LOAD_5_TIMES, str(exp)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: cannot read checkpoint") and out.stderr.count("\n") == 1, out.stderr


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_data_error_after_logging_started_leaves_no_atexit_traceback(tmp_path):
    # the train split reads, the val split (the first picture's batch, fetched once the TensorBoard writer is open)
    # is missing: the writer must still be closed, or its atexit hook prints a traceback after the error line
    from cinema_jax.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "ds", n_subjects=2, seed=0)
    for p in (tmp_path / "ds").glob("val.*"):
        p.unlink()
    out = run_cli("train", f"--config={MAE}", f"--workdir={tmp_path / 'run'}", "--config.data.source=arrayrecord",
                  f"--config.data.path={tmp_path / 'ds'}", "--config.total_steps=4")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "val.array_record" in lines[0], out.stderr
