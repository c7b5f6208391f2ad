"""Test setup: 8 simulated CPU devices (set before jax is imported) and the shared fixtures path."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py for every test directory

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repo; tests that need it skip with a clear message when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (expected ../shared beside the repository)")
    return SHARED


@pytest.fixture(scope="session")
def upstream_fixtures(shared_dir) -> Path:
    path = shared_dir / "fixtures" / "cinema_upstream"
    if not (path / "meta.json").is_file():
        pytest.skip(f"CineMA reference fixtures not found at {path}")
    return path


@pytest.fixture(scope="session")
def sunnybrook_dir(shared_dir) -> Path:
    path = shared_dir / "data" / "sunnybrook"
    if not path.is_dir():
        pytest.skip(f"Sunnybrook data not found at {path}")
    return path
