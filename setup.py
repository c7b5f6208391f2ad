"""cinema-jax: cine cardiac MRI foundation models (CineMA, SNRAware, Chen 2019) in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith(("#", "-"))
]

setup(
    name="cinema-jax",
    version="0.1.0",
    description="JAX/Flax cine CMR foundation models: CineMA MAE, SNRAware denoising, Chen 2019 normalisation",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["cinema_jax", "cinema_jax.*"]),
    install_requires=requirements,
    extras_require={
        # Building TFDS datasets imports TensorFlow: kept optional, the default path is ArrayRecord + Grain.
        "tfds": ["tensorflow-datasets>=4.9.9", "tensorflow-cpu>=2.20", "importlib_resources>=6"],  # tfds imports it
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["cinema-jax=cinema_jax.cli:main"]},
)
