"""The SNRAware reference's training files: HDF5 with `/<group>/<case>/{image, gmap}`, one case per group.

Why a module of its own: the denoiser trains on complex 2D+T series with their g-factor maps, not on the CineMA
layout; `H5CaseSource` serves them to Grain (h5py is imported only when a source is built). numpy / h5py only:
no jax.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from grain.sources import RandomAccessDataSource

from cinema_jax.errors import DataError


def _h5_cases(f) -> list[str]:
    """Paths of the groups (of an open h5py File) that hold a dataset named 'image'; '' for the root."""
    import h5py

    found = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] == "image":
            found.append(name.rsplit("/", 1)[0] if "/" in name else "")

    f.visititems(visit)
    return sorted(found)


class H5CaseSource(RandomAccessDataSource):
    """Grain source over the SNRAware reference's training files: HDF5 with `/<group>/<case>/{image, gmap}`.

    Each item: 'image' complex64 (x, y, t) (a real array is taken as magnitude, imaginary part 0; (x, y) as one
    frame), 'gmaps' float32 (x, y, 1 or t, N) when the case has a 'gmap' ((x, y) is one map), 'case' (the group
    path) and 'file'. Any group holding a dataset named 'image' is a case. Files are opened per read, so the source
    pickles into Grain workers as paths and an index.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        import h5py

        self.paths = tuple(str(p) for p in paths)
        if not self.paths:
            raise DataError("H5CaseSource: no files given")
        cases = []
        for path in self.paths:
            if not Path(path).is_file():
                raise DataError(f"{path}: HDF5 file not found")
            try:
                with h5py.File(path, "r") as f:
                    cases += [(path, c) for c in _h5_cases(f)]
            except Exception as err:
                raise DataError(f"{path}: cannot read HDF5 ({type(err).__name__}: {err})") from None
        if not cases:
            raise DataError(f"{', '.join(self.paths)}: no case groups holding an 'image' dataset")
        self._cases = cases

    def __len__(self) -> int:
        return len(self._cases)

    def __repr__(self) -> str:
        return f"H5CaseSource(paths={list(self.paths)!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        import h5py

        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        path, case = self._cases[index]
        where = f"{path}:/{case}"
        try:
            with h5py.File(path, "r") as f:
                group = f[case] if case else f
                image = np.asarray(group["image"])
                gmap = np.asarray(group["gmap"]) if "gmap" in group else None
        except Exception as err:
            raise DataError(f"{where}: cannot read ({type(err).__name__}: {err})") from None
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.dtype.kind not in "fciu":
            raise DataError(f"{where}: 'image' must be a numeric (x, y, t) or (x, y) array, got {image.dtype} "
                            f"{image.shape}")
        image = image.astype(np.complex64)
        if not np.isfinite(image).all():
            raise DataError(f"{where}: 'image' holds NaN or infinite values")
        if not image.size or not image.any():
            raise DataError(f"{where}: 'image' {image.shape} is empty or all zero (nothing to denoise)")
        out: dict[str, Any] = {"image": image, "case": case, "file": path}
        if gmap is not None:
            if gmap.ndim == 2:
                gmap = gmap[:, :, None, None]
            if (gmap.ndim != 4 or gmap.shape[:2] != image.shape[:2] or gmap.shape[2] not in (1, image.shape[2])
                    or gmap.shape[3] == 0):
                raise DataError(f"{where}: 'gmap' must be (x, y) or (x, y, 1 or t, N) matching the image "
                                f"{image.shape}, got {gmap.shape}")
            gmap = gmap.astype(np.float32)
            if not np.isfinite(gmap).all() or (gmap <= 0).any():
                raise DataError(f"{where}: 'gmap' must be finite and positive (g-factors are >= 1)")
            out["gmaps"] = gmap
        return out
