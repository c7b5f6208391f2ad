"""Checkpoints you can trust (issue 21, class 5).

Before: one flipped byte in a saved params file loaded silently (and changed 57 % of a mask); 64 bytes loaded NaN
weights that `infer` blamed on the image. Now every params export and training state carries per-tensor checksums,
verified on restore, on `init_from`, `eval` and `infer --ckpt`: a mismatch is one `error:` line naming the checkpoint.
Temporary folders a killed save left behind are removed when the run resumes."""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_toy_task import toy_config  # noqa: E402

from cinema_jax.errors import CheckpointError  # noqa: E402
from cinema_jax.train import checkpoint as ckpt  # noqa: E402
from cinema_jax.train import integrity  # noqa: E402
from cinema_jax.train.loop import train  # noqa: E402


def test_device_and_host_checksums_agree_on_any_mesh():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(16, 24)).astype(np.float32), "b": rng.normal(size=(8,)).astype(jnp.bfloat16),
            "n": np.arange(5, dtype=np.int32), "k": np.array([7, 9], np.uint32)}
    host = integrity.host_checksums(tree)
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = dict(tree, w=jax.device_put(tree["w"], NamedSharding(mesh, P("a", "b"))),
                   b=jax.device_put(tree["b"], NamedSharding(mesh, P("b"))))
    found, finite = integrity.device_checksums(sharded)
    assert found == host and finite
    one = dict(tree, w=tree["w"].copy())
    one["w"].view(np.uint8)[0, 37] ^= 1  # one bit of one byte
    assert integrity.mismatches(host, integrity.host_checksums(one)) == ["w"]
    swapped = dict(tree, w=tree["w"][::-1].copy())  # same bytes, another order
    assert integrity.mismatches(host, integrity.host_checksums(swapped)) == ["w"]
    _, finite = integrity.device_checksums(dict(tree, w=np.full((2,), np.nan, np.float32)))
    assert not finite


def _data_files(d: Path) -> list[Path]:
    return sorted((p for p in d.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: -p.stat().st_size)


def _silent_corruption(directory: Path, raw_read, original, pattern=b"\x01"):
    """Corrupt bytes of a data file at the first place Orbax still reads without complaint but with other values
    (what used to load silently: TensorStore checks its b-tree nodes, not the chunks); returns (file, offset)."""
    for f in _data_files(directory):
        good = f.read_bytes()
        for off in np.linspace(len(good) // 4, len(good) - len(pattern) - 1, 40).astype(int):
            bad = bytearray(good)
            for i, b in enumerate(pattern):
                bad[off + i] = bad[off + i] ^ b if len(pattern) == 1 else b
            f.write_bytes(bytes(bad))
            try:
                got = raw_read()
            except Exception:  # noqa: BLE001 - this place breaks decoding (a checked node): try another
                continue
            if any(not np.array_equal(a, b, equal_nan=True) for a, b in
                   zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(original))):
                return f, off
        f.write_bytes(good)
    raise AssertionError("no silent corruption found")


@pytest.mark.parametrize("pattern", [b"\x01", b"\xff" * 64], ids=["one_byte", "64_bytes"])
def test_a_corrupt_params_export_is_refused(tmp_path, pattern):
    rng = np.random.default_rng(1)
    params = {"enc": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)},
              "head": {"bias": rng.normal(size=(64,)).astype(np.float32)}}
    out = ckpt.save_params(tmp_path / "p", params, {"task": "toy_regress"})
    got, _ = ckpt.load_params(out)
    np.testing.assert_array_equal(got["enc"]["kernel"], params["enc"]["kernel"])
    _silent_corruption(out / "params", lambda: ckpt._numpy_restore(out / "params"), params, pattern)
    with pytest.raises(CheckpointError, match=rf"checkpoint {out} is corrupt: 1 tensor\(s\) differ .*first: "):
        ckpt.load_params(out)


def test_a_corrupt_training_checkpoint_is_refused_on_resume_and_as_params(tmp_path, capsys):
    from cinema_jax.cli import main as cli

    run = tmp_path / "run"
    # width 64: tensors big enough that OCDBT stores them out of line, in data chunks it does not checksum (small
    # values are inlined in its CRC-checked b-tree nodes)
    train(toy_config({"total_steps": 8, "checkpoint_every": 4, "keep_checkpoints": 5, "model.width": 64}), run)
    step8 = run / "checkpoints" / "8"
    params, _ = ckpt.load_params(step8)
    _silent_corruption(step8 / "state", lambda: ckpt._numpy_restore(step8 / "state", "params"), params)
    with pytest.raises(CheckpointError, match=rf"checkpoint {step8} is corrupt"):
        ckpt.load_params(step8)
    capsys.readouterr()
    rc = cli(["train", "--config=tests/train/toy_config.py", "--config.total_steps=12", "--config.model.width=64",
              f"--workdir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: checkpoint {step8} is corrupt") and err.count("\n") == 1, err
    assert "delete it to resume from step 4" in err


def test_infer_names_a_corrupt_checkpoint_not_the_image(tmp_path, capsys):
    from helpers import init_params

    from cinema_jax.cli import main as cli
    from cinema_jax.data import io, phantom

    config, params = init_params("segment", "configs/finetune_seg.py:smoke")
    run = ckpt.save_params(tmp_path / "seg", params, config)
    _silent_corruption(run / "params", lambda: ckpt._numpy_restore(run / "params"), params, b"\xff" * 64)
    cfg = phantom.PhantomConfig(sax_size=(48, 48), n_slices=6, sax_spacing=(4.0, 4.0, 10.0), n_frames=2)
    r = phantom.render(phantom.sample_subject(1, 2, cfg), None, ("sax",), cfg)
    io.write_nifti(tmp_path / "case.nii.gz", np.moveaxis(r["sax"], 0, -1) * 800, spacing=(4.0, 4.0, 10.0))
    rc = cli(["infer", "segment", "--ckpt", str(run), "--input", str(tmp_path / "case.nii.gz"), "--output",
              str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: checkpoint {run} is corrupt") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_leftover_temporaries_are_cleaned_on_resume(tmp_path):
    run = tmp_path / "run"
    train(toy_config({"total_steps": 4, "eval_every": 2}), run)
    left = [run / ".best.a1B2c3D4.tmp", run / ".best.Zz99yy00.old", run / ".config.json.abcd1234.tmp.json",
            run / "images" / ".step_0000002.png.q1w2e3r4.tmp.png"]
    for p in left:
        p.parent.mkdir(exist_ok=True)
        if p.suffix in (".tmp", ".old"):
            (p / "params").mkdir(parents=True)
        else:
            p.write_text("half")
    keep = run / "images" / "mine.png"
    keep.write_bytes(b"png")
    train(toy_config({"total_steps": 6, "eval_every": 2}), run)
    assert not any(p.exists() for p in left) and keep.exists()
