"""`python -m cinema_jax ...` is the same as the `cinema-jax` console script."""

from cinema_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
