"""The data source a config names: `make_source(config.data, split)` builds it from `data.source`.

Why a module of its own: the config keys of every on-disk source are read in one place (with `cinema_jax.config.get`),
so the source modules take plain arguments and the tasks never spell a storage format. numpy only: no jax.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cinema_jax.config import get
from cinema_jax.data.arrayrecord import ArrayRecordSource
from cinema_jax.data.h5cases import H5CaseSource
from cinema_jax.data.layout import CinemaLayoutSource
from cinema_jax.data.sunnybrook import SunnybrookSource
from cinema_jax.data.synthetic import SyntheticIndexSource
from cinema_jax.errors import ConfigError, DataError


def _given(value, key: str, source: str):
    """`value` of data.<key>, which `source` needs: absent (None) or the base config's '' is one line naming both."""
    if value in (None, ""):
        raise ConfigError(f"data.{key} is required for data.source={source!r}")
    return value


def cinema_layout_source(data_config, split: str) -> CinemaLayoutSource:
    """data.root (processed dataset dir), data.views (default ('sax',)), data.with_labels (default True),
    data.cine / data.edes (defaults False / True: see `CinemaLayoutSource`)."""
    # every key but root is optional by design: a config for another source need not carry this one's options
    return CinemaLayoutSource(_given(get(data_config, "root", None), "root", "cinema_layout"), split,
                              tuple(get(data_config, "views", ("sax",))), bool(get(data_config, "with_labels", True)),
                              cine=bool(get(data_config, "cine", False)), edes=bool(get(data_config, "edes", True)))


def arrayrecord_source(data_config, split: str) -> ArrayRecordSource:
    """data.path: a directory holding `<split>.array_record` or a pattern with '{split}'."""
    path = str(_given(get(data_config, "path", None), "path", "arrayrecord"))
    if "{split}" in path:
        return ArrayRecordSource(path.format(split=split))
    p = Path(path)
    return ArrayRecordSource(p / f"{split}.array_record" if p.is_dir() else p)


def sunnybrook_source(data_config, split: str) -> SunnybrookSource:
    """data.root (Sunnybrook dir), data.mode ('volume' | 'slice'), data.preprocess, data.subjects (per-split dict
    or list; default: all subjects for every split, as Sunnybrook here is an evaluation set)."""
    subjects = get(data_config, "subjects", None)
    if isinstance(subjects, Mapping) or hasattr(subjects, "keys"):
        subjects = get(subjects, split, None)
    return SunnybrookSource(_given(get(data_config, "root", None), "root", "sunnybrook"),
                            str(get(data_config, "mode", "volume")), bool(get(data_config, "preprocess", False)),
                            subjects)


def synthetic_source(data_config, split: str) -> SyntheticIndexSource:
    """data.n_subjects: int or per-split dict (default train 64 / val 16 / test 16); data.seed (default 0).

    Splits use disjoint index ranges (train from 0, val from 1_000_000, test from 2_000_000)."""
    n = get(data_config, "n_subjects", {"train": 64, "val": 16, "test": 16})
    if isinstance(n, Mapping) or hasattr(n, "keys"):
        n = get(n, split, 16)
    offsets = {"train": 0, "val": 1_000_000, "test": 2_000_000}
    return SyntheticIndexSource(int(n), int(get(data_config, "seed", 0)), offsets.get(split, 3_000_000))


def h5_source(data_config, split: str) -> H5CaseSource:
    """data.path: a pattern with '{split}' (a file or a directory of *.h5), or a directory holding `<split>.h5` or
    `<split>/*.h5`."""
    pattern = str(_given(get(data_config, "path", None), "path", "h5"))
    path = Path(pattern.format(split=split))
    if path.is_dir() and "{split}" not in pattern:
        if (path / f"{split}.h5").is_file():
            return H5CaseSource([path / f"{split}.h5"])
        path = path / split
    if path.is_dir():
        files = sorted(list(path.glob("*.h5")) + list(path.glob("*.hdf5")))
        if not files:
            raise DataError(f"{path}: no *.h5 files")
        return H5CaseSource(files)
    if not path.is_file():
        raise DataError(f"{path}: HDF5 file or directory for split {split!r} not found")
    return H5CaseSource([path])


SOURCES = {"cinema_layout": cinema_layout_source, "arrayrecord": arrayrecord_source,
           "sunnybrook": sunnybrook_source, "synthetic": synthetic_source, "h5": h5_source}


def make_source(data_config, split: str):
    """Build the RandomAccessDataSource named by `data_config.source` for `split` ('train' / 'val' / 'test')."""
    name = get(data_config, "source", None)  # absent: refused below with the list of sources
    if name not in SOURCES:
        raise ConfigError(f"data.source={name!r} is unknown; choose from {sorted(SOURCES)}")
    return SOURCES[name](data_config, split)
