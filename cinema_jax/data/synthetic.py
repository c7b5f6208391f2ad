"""The phantom as a dataset: an index source for on-the-fly rendering, and layout-style records on disk.

Why: training on the phantom needs no files (`SyntheticIndexSource` hands the task a seed and an index, the task's
transform renders), while throughput at accelerator rates and the TFDS builder want pre-rendered records with the
CineMA layout's keys (`synthetic_record`), written to ArrayRecord by `write_synthetic_dataset`
(`cinema-jax data synth --out`). numpy only: no jax.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from grain.sources import RandomAccessDataSource

from cinema_jax.config import to_plain
from cinema_jax.data import phantom
from cinema_jax.data.arrayrecord import write_arrayrecord
from cinema_jax.errors import ConfigError
from cinema_jax.fileutil import atomic_dir


def synthetic_record(seed: int, index: int, cfg=None, views: Sequence[str] | None = None,
                     cine: bool = False) -> dict[str, Any]:
    """One phantom subject as a layout-style record (same keys as `CinemaLayoutSource` items).

    '<view>_ed' / '<view>_es' float32 in [0, 1] (SAX (x, y, z), LAX (x, y)), '<view>_ed_gt' / '<view>_es_gt' uint8,
    LAX '<view>_ed_landmarks' / '<view>_es_landmarks' (3, 2) pixel (x, y), '<view>_spacing' mm, optional
    '<view>_t' cine (x, y[, z], t), plus the phantom metadata (ed_frame, es_frame, lv_edv... mL / %, phenotype,
    site/... fields).
    """
    cfg = cfg if cfg is not None else phantom.PhantomConfig()
    views = tuple(views) if views is not None else tuple(phantom.VIEWS)
    subject = phantom.sample_subject(seed, index, cfg)
    meta = phantom.subject_metadata(subject, cfg)
    ed, es = int(meta["ed_frame"]), int(meta["es_frame"])
    frames = list(range(cfg.n_frames)) if cine else [ed, es]
    rendered = phantom.render(subject, frames, views, cfg, labels=True)
    pick = {"ed": frames.index(ed), "es": frames.index(es)}
    rec: dict[str, Any] = {"pid": f"synth_{seed}_{index:06d}"}
    for view in views:
        img, lab = rendered[view], rendered[f"{view}_label"]
        for phase, k in pick.items():
            rec[f"{view}_{phase}"] = np.ascontiguousarray(img[k], np.float32)
            rec[f"{view}_{phase}_gt"] = np.ascontiguousarray(lab[k], np.uint8)
            if f"{view}_landmarks" in rendered:
                rec[f"{view}_{phase}_landmarks"] = np.asarray(rendered[f"{view}_landmarks"][k], np.float32)
        if f"{view}_spacing" in rendered:
            rec[f"{view}_spacing"] = np.asarray(rendered[f"{view}_spacing"], np.float32)
        if cine:
            rec[f"{view}_t"] = np.ascontiguousarray(np.moveaxis(img, 0, -1), np.float32)
    for key, value in meta.items():
        rec[key] = to_plain(value)  # nested dicts with str keys, as `encode_record` stores them
    return rec


def _image_keys(record: Mapping[str, Any]) -> list[str]:
    return [k for k in record if re.fullmatch(r"(sax|lax_[234]c)_(ed|es|t)", k)]


def write_synthetic_dataset(out_dir: str | os.PathLike, n_subjects: int = 32, seed: int = 0,
                            val_fraction: float = 0.25, cfg=None, views: Sequence[str] | None = None,
                            cine: bool = False, overwrite: bool = False) -> dict[str, int]:
    """Render `n_subjects` phantom subjects into `<out_dir>/{train,val}.array_record` (+ `info.json`).

    Images are stored quantised to uint8 (as the reference stores processed data) and decode to float32 in [0, 1].
    `cine`: every frame too ('<view>_t', in `<split>.frames.array_record`, one record per frame: see
    `write_arrayrecord`). The last round(n * val_fraction) subject indices (>= 1 when n >= 2) form `val`. Written
    atomically.
    """
    if n_subjects < 1:
        raise ConfigError(f"n_subjects must be >= 1, got {n_subjects}")
    n_val = min(n_subjects - 1, max(1, int(round(n_subjects * val_fraction)))) if n_subjects >= 2 else 0
    splits = {"train": range(0, n_subjects - n_val), "val": range(n_subjects - n_val, n_subjects)}

    def records(indices):
        for i in indices:
            yield synthetic_record(seed, i, cfg, views, cine)

    counts = {}
    with atomic_dir(out_dir, overwrite=overwrite, kind="dataset") as tmp:
        first = synthetic_record(seed, 0, cfg, views, cine)
        quantize = _image_keys(first)
        frames = [k for k in quantize if k.endswith("_t")]
        for split, idx in splits.items():
            if len(idx):
                counts[split] = write_arrayrecord(tmp / f"{split}.array_record", records(idx), quantize, frames,
                                                  frame_records=cine)
        info = {"kind": "synthetic", "seed": seed, "n_subjects": n_subjects, "splits": counts,
                "keys": sorted(first), "quantized": quantize, "cine": cine}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
    return counts


class SyntheticIndexSource(RandomAccessDataSource):
    """Light source for on-the-fly phantom rendering: item i = {'seed', 'index'} (the task's transform renders)."""

    def __init__(self, n_subjects: int, seed: int = 0, offset: int = 0):
        self.n, self.seed, self.offset = int(n_subjects), int(seed), int(offset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} subjects")
        return {"seed": np.int64(self.seed), "index": np.int64(self.offset + index)}

    def __repr__(self) -> str:
        return f"SyntheticIndexSource(n_subjects={self.n}, seed={self.seed}, offset={self.offset})"
