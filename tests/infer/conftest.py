"""Fixtures shared by the inference tests."""

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cinema_jax.tasks.denoise import TASK  # noqa: E402
from configs.denoise import get_config  # noqa: E402


@pytest.fixture(scope="module")
def bundle():
    """(model, params, config) of the smoke denoiser, freshly initialised."""
    c = get_config("smoke")
    model = TASK.make_model(c)
    ex = TASK.example_batch(c, 1)
    # RBG key: XLA on CPU compiles the threefry initialisers far slower than the model (same parameter tree)
    params = jax.jit(lambda: model.init({"params": jax.random.key(0, impl="rbg")}, ex["image"]))()["params"]
    return model, params, c
