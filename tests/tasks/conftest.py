"""Shared by the task tests: one MAE smoke run per session, used as `init_from` by every fine-tune smoke test."""

import pytest

from cinema_jax.config import load_config


@pytest.fixture(scope="session")
def mae_smoke(tmp_path_factory):
    """Train configs/mae_pretrain.py:smoke once (16 steps) and return its workdir."""
    from cinema_jax.train.loop import train

    root = tmp_path_factory.getbasetemp() / "mae_smoke"
    if not (root / "best").is_dir() and not (root / "checkpoints").is_dir():
        train(load_config("configs/mae_pretrain.py:smoke", ["total_steps=16", "eval_every=16"]), root)
    return root
