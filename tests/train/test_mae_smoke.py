"""The MAE `smoke` config through the real loop: same loss curve on every mesh; the loss goes down."""

import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.train.logging import read_metrics
from cinema_jax.train.loop import train

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def smoke(**over):
    return load_config("configs/mae_pretrain.py:smoke", [f"{k}={v}" for k, v in over.items()])


def curve(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


@pytest.mark.slow
def test_smoke_loss_curve_is_mesh_invariant(tmp_path):
    curves = {}
    for d, f, t in MESHES:
        cfg = smoke(**{"total_steps": 3, "log_every": 1, "eval_every": 0, "image_every": 0, "checkpoint_every": 0,
                       "mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t})
        train(cfg, tmp_path / f"{d}{f}{t}")
        curves[(d, f, t)] = curve(tmp_path / f"{d}{f}{t}")
    ref = curves[(1, 1, 1)]
    assert [s for s, _ in ref] == [1, 2, 3]
    for mesh, c in curves.items():
        np.testing.assert_allclose([v for _, v in c], [v for _, v in ref], rtol=1e-4, err_msg=str(mesh))


@pytest.mark.slow
def test_smoke_run_learns_and_writes_pictures(tmp_path):
    train(smoke(), tmp_path)
    c = curve(tmp_path)
    assert c[-1][0] == 64 and c[-1][1] < 0.5 * c[0][1]
    evals = [r["eval/loss"] for r in read_metrics(tmp_path) if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] <= evals[0] * 1.05
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["step_0000032.png", "step_0000064.png"]
    assert (tmp_path / "best" / "params").is_dir()
