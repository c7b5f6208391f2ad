"""Optional tensorflow-datasets builders for the synthetic dataset and local CineMA-layout datasets.

Why optional: building with TFDS imports TensorFlow (a large download for 2-core CI machines), so the default path
writes ArrayRecord directly (`arrayrecord.write_arrayrecord`) and reads it with Grain. Users who prefer the TFDS
catalogue workflow install the extra (`pip install .[tfds]`) and then:

    from cinema_jax.data import tfds_builders
    src = tfds_builders.data_source('cinema_synthetic', 'train', data_dir=DIR)           # built on first use
    src = tfds_builders.data_source('cinema_layout', 'train', data_dir=DIR, manual_dir=PROCESSED_ROOT)
    grain.MapDataset.source(src)  # random access, decoded to numpy

tensorflow_datasets is imported only inside `builders()`; importing this module never needs it.
Features follow the layout record convention of `cinema_jax.data.layout` (images float32 in [0, 1], SAX (x, y, z),
LAX (x, y); labels uint8, 0 BG, 1 RV, 2 MYO, 3 LV).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from cinema_jax.errors import CinemaError

SYNTHETIC_SPLITS = {"train": 64, "val": 16, "test": 16}  # subjects per split of the TFDS synthetic dataset
_LAYOUT_METADATA = ("lv_edv", "lv_esv", "lv_ef", "rv_edv", "rv_esv", "rv_ef")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise CinemaError(f"tensorflow-datasets is not installed ({err}); install the optional extra with "
                          "`pip install '.[tfds]'` or use the default ArrayRecord + Grain path "
                          "(`cinema-jax data synth --out DIR`)") from None
    return tfds


def tfds_available() -> bool:
    """True when tensorflow_datasets can be imported (the [tfds] extra is installed)."""
    try:
        _import_tfds()
    except CinemaError:
        return False
    return True


def _view_features(tfds, views, sax_size, n_slices, lax_size, labels: bool, landmarks: bool) -> dict:
    feats = {}
    for view in views:
        shape = tuple(sax_size) + (n_slices,) if view == "sax" else tuple(lax_size)
        for phase in ("ed", "es"):
            feats[f"{view}_{phase}"] = tfds.features.Tensor(shape=shape, dtype=np.float32)
            if labels:
                feats[f"{view}_{phase}_gt"] = tfds.features.Tensor(shape=shape, dtype=np.uint8)
            if landmarks and view != "sax":
                feats[f"{view}_{phase}_landmarks"] = tfds.features.Tensor(shape=(3, 2), dtype=np.float32)
        feats[f"{view}_spacing"] = tfds.features.Tensor(shape=(3 if view == "sax" else 2,), dtype=np.float32)
    return feats


@functools.cache
def builders() -> dict[str, type]:
    """Define (once) and return the builder classes {'cinema_synthetic': ..., 'cinema_layout': ...}.

    Defining them registers them with TFDS under those names, so `tfds.builder(name)` / `tfds.data_source(name)`
    find them afterwards.
    """
    tfds = _import_tfds()
    from cinema_jax.data import layout, phantom, synthetic

    class CinemaSynthetic(tfds.core.GeneratorBasedBuilder):
        """Built-in synthetic multi-view cine CMR phantom at ED and ES (seeded, deterministic)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Phantom subjects; SAX 192x192x16 at 1x1x10 mm, LAX 256x256 at 1 mm."}
        SEED = 0

        def _info(self):
            cfg = phantom.PhantomConfig()
            feats = _view_features(tfds, phantom.VIEWS, cfg.sax_size, cfg.n_slices, cfg.lax_size, True, True)
            feats.update({"pid": tfds.features.Text(), "phenotype": tfds.features.ClassLabel(
                names=list(phantom.PHENOTYPES)), "ed_frame": np.int64, "es_frame": np.int64,
                **{k: np.float32 for k in _LAYOUT_METADATA}})
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(feats),
                                                  homepage="https://github.com/mathpluscode/CineMA")

        def _split_generators(self, dl_manager):
            offsets = {"train": 0, "val": 1_000_000, "test": 2_000_000}
            return {s: self._generate_examples(offsets[s], n) for s, n in SYNTHETIC_SPLITS.items()}

        def _generate_examples(self, offset: int, n: int):
            for i in range(offset, offset + n):
                rec = synthetic.synthetic_record(self.SEED, i)
                yield rec["pid"], _select(rec, self.info.features.keys())

    class CinemaLayout(tfds.core.GeneratorBasedBuilder):
        """A local dataset in the CineMA processed layout (e.g. from `cinema-jax data prepare`), SAX ED/ES."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "SAX ED/ES images and labels with LV/RV volumes from the metadata CSVs."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Put a processed CineMA-layout dataset in `manual_dir`: `<split>/<pid>/<pid>_sax_{ed,es}[_gt].nii.gz` "
            "and `<split>_metadata.csv` for splits train / val / test. Create it from a raw ACDC, M&Ms or M&Ms-2 "
            "release with `cinema-jax data prepare DATASET RAW_DIR OUT_DIR` and pass OUT_DIR as manual_dir.")

        def _info(self):
            feats = _view_features(tfds, ("sax",), layout.SAX_SIZE, None, None, True, False)
            feats.update({"pid": tfds.features.Text(), **{k: np.float32 for k in _LAYOUT_METADATA}})
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(feats))

        def _split_generators(self, dl_manager):
            root = Path(dl_manager.manual_dir)
            splits = [s for s in ("train", "val", "test") if (root / f"{s}_metadata.csv").is_file()]
            if not splits:
                raise CinemaError(f"{root}: no <split>_metadata.csv found; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
            return {s: self._generate_examples(root, s) for s in splits}

        def _generate_examples(self, root: Path, split: str):
            src = layout.CinemaLayoutSource(root, split, ("sax",), with_labels=True)
            for i in range(len(src)):
                rec = src[i]
                yield rec["pid"], _select(rec, self.info.features.keys())

    return {"cinema_synthetic": CinemaSynthetic, "cinema_layout": CinemaLayout}


def _select(record: dict[str, Any], keys) -> dict[str, Any]:
    out = {}
    for k in keys:
        v = record.get(k)
        if k in _LAYOUT_METADATA:
            v = np.float32(np.nan if v is None else v)
        out[k] = v
    return out


def data_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None):
    """Build (first call) and open a split of 'cinema_synthetic' or 'cinema_layout' as a TFDS ArrayRecord source.

    The result is a random-access sequence of numpy dicts for `grain.MapDataset.source`.
    """
    tfds = _import_tfds()
    classes = builders()
    if name not in classes:
        raise CinemaError(f"unknown TFDS dataset {name!r}; choose from {sorted(classes)}")
    builder = classes[name](data_dir=None if data_dir is None else str(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
    builder.download_and_prepare(download_config=config)
    return builder.as_data_source(split=split)
