"""cinema-jax: cine cardiac MRI foundation models (CineMA, SNRAware, Chen 2019) in JAX/Flax.

Layout follows the data path: `data` (numpy only) -> `models` (pure Flax) -> `train` (one loop, sharding,
checkpoints) -> `tasks` (one module per task) -> `infer` / `cli`.
"""

__version__ = "0.1.0"
