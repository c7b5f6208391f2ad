"""`python -m cinema_jax.bench --config=configs/bench.py:NAME`: one JSON line; a user-caused problem is one
`error: ...` line and exit code 2."""

import sys

from cinema_jax.bench import main
from cinema_jax.errors import CinemaError

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CinemaError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
