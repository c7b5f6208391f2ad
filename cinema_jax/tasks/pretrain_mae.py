"""CineMA MAE pretraining task (../shared/docs/cinema.md §2): on the built-in phantom or on prepared data.

One record per subject per epoch. `transform` takes one frame of the cardiac cycle (random when training, the first
for eval) for all configured views at that SAME frame, applies the reference augmentation (random isotropic zoom,
prob 0.5, factor 0.9-1.1, size kept, zero padding), min-max scales each view to [0, 1] and end-pads SAX slices.
Loss = the MAE model's masked-patch MSE (mean per view, then over views); eval metric = validation loss with fixed
masks.

`data.source`:
  synthetic      (default) light `{'seed', 'index'}` records; the phantom renders the frame in the worker.
  arrayrecord    `data.path`: a directory with `{train,val}.array_record` (e.g. `cinema-jax data synth --out DIR
                 --cine`), or a pattern with '{split}'. Records with cine arrays '<view>_t' (x, y[, z], t) give a
                 random frame t of all T (UK Biobank-style pretraining); records with only '<view>_ed' / '<view>_es'
                 give ED or ES at random.
  cinema_layout  `data.root`: the processed NIfTI layout (`cinema-jax data prepare`): ED or ES at random; with
                 `data.cine=True` a random frame of `<pid>_<view>_t.nii.gz` (the whole 4-D file is read per
                 sample: `cinema-jax data pack` the layout to ArrayRecord for speed).
Images whose '<view>_spacing' differs from `data.sax_spacing` / `data.lax_spacing` are resampled (linear) to it;
then cropped / padded to the configured size (SAX: centre in-plane, end in depth; LAX: centre). The config derives
`total_steps` and `optim.warmup_steps` from epochs x `data.n_subjects.train` (the phantom's subject count); on a
record dataset of another size set them (`configure` prints the values that keep the epochs when they are left at
the derived ones).

Sample layout (no batch dim): '<view>' float32 (X, Y, Z, 1) for sax, (X, Y, 1) for lax_*.
"""

from __future__ import annotations

import numpy as np

from cinema_jax.config import get
from cinema_jax.data import transforms
from cinema_jax.tasks.base import Task

SPLIT_SEED_OFFSET = {"train": 0, "val": 100_000, "test": 200_000}


def _tuple(v) -> tuple:
    return tuple(int(a) for a in v)


def phantom_config(config):
    """PhantomConfig matching `config.data` (sizes, spacings, frames)."""
    from cinema_jax.data import phantom

    d = config.data
    sax = _tuple(d.sax_size)
    return phantom.PhantomConfig(sax_size=sax[:2], n_slices=sax[2], sax_spacing=tuple(float(s) for s in d.sax_spacing),
                                 lax_size=_tuple(d.lax_size), lax_spacing=tuple(float(s) for s in d.lax_spacing),
                                 n_frames=int(d.n_frames))


class PretrainMAE(Task):
    name = "pretrain_mae"
    eval_metric = "loss"
    eval_mode = "min"

    def views(self, config) -> tuple[str, ...]:
        return tuple(config.data.views)

    def image_size(self, config, view: str) -> tuple[int, ...]:
        return _tuple(config.data.sax_size) if view == "sax" else _tuple(config.data.lax_size)

    def configure(self, config):
        """On a record dataset whose size differs from `data.n_subjects.train`, say which schedule keeps the epochs
        (the config derived `total_steps` from the phantom's subject count before the dataset was known)."""
        import sys

        if str(get(config, "data.source")) == "synthetic" or "epochs" not in config:
            return self
        batch = int(config.batch_size)
        per_epoch = max(int(config.data.n_subjects.train) // batch, 1)
        if int(config.total_steps) != int(config.epochs) * per_epoch:
            return self  # total_steps was set explicitly
        n = len(self.source(config, "train"))
        if n == int(config.data.n_subjects.train):
            return self
        steps = max(n // batch, 1)
        print(f"note: pretraining on {n} training records, but total_steps={int(config.total_steps)} was derived "
              f"from data.n_subjects.train={int(config.data.n_subjects.train)}; for {int(config.epochs)} epochs of "
              f"this dataset pass --config.total_steps={int(config.epochs) * steps} "
              f"--config.optim.warmup_steps={int(get(config, 'warmup_epochs')) * steps}", file=sys.stderr)
        return self

    def make_model(self, config):
        from cinema_jax.models import build_mae
        from cinema_jax.tasks.common import model_runtime  # one reader of the run-time keys for every task

        model_cfg = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
        model_cfg["views"] = list(self.views(config))
        model_cfg["image_size"] = {v: list(self.image_size(config, v)) for v in self.views(config)}
        return build_mae(model_cfg, **model_runtime(config))

    def source(self, config, split: str):
        import grain

        from cinema_jax.errors import ConfigError

        name = str(get(config, "data.source"))
        if name in ("arrayrecord", "cinema_layout"):
            from cinema_jax.data import sources

            if name == "arrayrecord":
                return grain.MapDataset.source(sources.arrayrecord_source(config.data, split))
            cine = bool(get(config, "data.cine"))  # pretraining reads the cine files or ED/ES, not both
            layout = {"root": get(config, "data.root"), "views": self.views(config), "with_labels": False,
                      "cine": cine, "edes": not cine}
            return grain.MapDataset.source(sources.cinema_layout_source(layout, split))
        if name != "synthetic":
            raise ConfigError(f"data.source={name!r} is unknown for pretraining; choose from synthetic, "
                              "arrayrecord, cinema_layout")
        n = dict(config.data.n_subjects)
        if split not in n:
            raise KeyError(split)
        seed = int(get(config, "data.phantom_seed")) + SPLIT_SEED_OFFSET.get(split, 300_000)
        return grain.MapDataset.source([{"seed": seed, "index": i} for i in range(int(n[split]))])

    def transform(self, record, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        views = self.views(config)
        if str(get(config, "data.source")) == "synthetic":
            images = self._phantom_frame(record, rng, config, train)
        else:
            images = self._record_frame(record, rng, config, train)
        d = config.data
        out = {}
        for view in views:
            img = images[view]
            if train:
                img = transforms.random_zoom(img, rng, prob=float(d.zoom_prob), zoom_range=tuple(d.zoom_range))
            img = transforms.minmax_scale(img)
            size = self.image_size(config, view)
            if view == "sax":  # in-plane centred; slices zero-padded (or cut) at the end, as the reference
                img = transforms.crop_or_pad(img, size[:2], mode="center")
                img = transforms.crop_or_pad(img, size, mode="end")
            else:
                img = transforms.crop_or_pad(img, size, mode="center")
            out[view] = img[..., None].astype(np.float32)
        return out

    def _phantom_frame(self, record, rng, config, train: bool) -> dict[str, np.ndarray]:
        from cinema_jax.data import phantom

        pcfg = phantom_config(config)
        subject = phantom.sample_subject(int(record["seed"]), int(record["index"]), pcfg)
        frame = int(rng.integers(pcfg.n_frames)) if train else 0
        images = phantom.render(subject, frames=[frame], views=self.views(config), cfg=pcfg, labels=False)
        return {v: np.asarray(images[v][0], np.float32) for v in self.views(config)}

    def _record_frame(self, record, rng, config, train: bool) -> dict[str, np.ndarray]:
        """The same frame of every view from a prepared record, at the configured spacing."""
        from cinema_jax.data.arrayrecord import frame_of
        from cinema_jax.data.layout import resample
        from cinema_jax.errors import DataError

        views = self.views(config)
        where = f"record {record.get('pid', '?')!s}"
        ndim = {v: 3 if v == "sax" else 2 for v in views}
        if all(f"{v}_t" in record for v in views):
            cines = {v: record[f"{v}_t"] for v in views}  # arrays or FrameStacks (one frame decoded below)
            for v, c in cines.items():
                if np.ndim(c) != ndim[v] + 1:
                    raise DataError(f"{where}: '{v}_t' must be {'(x, y, z, t)' if v == 'sax' else '(x, y, t)'}, "
                                    f"got shape {np.shape(c)}")
            lengths = {v: int(np.shape(c)[-1]) for v, c in cines.items()}
            if len(set(lengths.values())) != 1:
                raise DataError(f"{where}: views have different frame counts {lengths}; pretraining takes the "
                                "same frame t of every view")
            t = int(rng.integers(next(iter(lengths.values())))) if train else 0
            frames = {v: frame_of(c, t) for v, c in cines.items()}
        else:
            missing = [f"{v}_{p}" for v in views for p in ("ed", "es") if f"{v}_{p}" not in record]
            if missing:
                raise DataError(f"{where}: missing {missing}; pretraining needs '<view>_t' cine arrays or "
                                f"'<view>_ed' and '<view>_es' for every view in data.views={list(views)}")
            phase = ("ed", "es")[int(rng.integers(2))] if train else "ed"
            frames = {v: np.asarray(record[f"{v}_{phase}"]) for v in views}
        d = config.data
        out = {}
        for v, img in frames.items():
            if img.ndim != ndim[v]:
                raise DataError(f"{where}: view {v!r} frame must be {ndim[v]}-D, got shape {img.shape}")
            img = np.asarray(img, np.float32)
            if not np.isfinite(img).all():
                raise DataError(f"{where}: view {v!r} has NaN or infinite intensities")
            target = [float(s) for s in (d.sax_spacing if v == "sax" else d.lax_spacing)]
            spacing = record.get(f"{v}_spacing")
            if spacing is not None:
                spacing = [float(s) for s in np.ravel(spacing)[: img.ndim]]
                if len(spacing) != img.ndim or not all(np.isfinite(spacing)) or min(spacing) <= 0:
                    raise DataError(f"{where}: '{v}_spacing' {spacing} does not fit a {img.ndim}-D image")
                if not np.allclose(spacing, target, rtol=1e-3):
                    img = resample(img, spacing, target, order=1)[0].astype(np.float32)
            out[v] = img
        return out

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        return {v: np.zeros((batch_size, *self.image_size(config, v), 1), np.float32) for v in self.views(config)}

    def model_inputs(self, batch) -> dict:
        return {"images": {k: v for k, v in batch.items()}}

    def loss(self, model, params, batch, rng, train: bool):
        import jax

        rngs = {"mask": jax.random.fold_in(rng, 0), "droppath": jax.random.fold_in(rng, 1),
                "dropout": jax.random.fold_in(rng, 2)}
        out = model.apply({"params": params}, **self.model_inputs(batch), train=train, rngs=rngs)
        aux = {f"{k[: -len('_mse_loss')]}_loss": v for k, v in out["metrics"].items() if k.endswith("_mse_loss")}
        return out["loss"], aux

    def images_per_sample(self, config) -> int:
        return len(self.views(config))

    # -------------------------------------------------------------------------------------------- eval
    def _eval_fn(self, model):
        import jax

        cache = self.__dict__.setdefault("_eval_fns", {})
        if id(model) not in cache:
            def fn(params, batch, key):
                return model.apply({"params": params}, **self.model_inputs(batch), train=False,
                                   rngs={"mask": key})

            cache[id(model)] = (model, jax.jit(fn))
        return cache[id(model)][1]

    def evaluate(self, model, params, batches, config) -> dict[str, float]:
        """Mean masked-patch MSE over the eval set (masks fixed by batch index), total and per view."""
        import jax

        fn = self._eval_fn(model)
        sums: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(batches):
            b = len(next(iter(batch.values())))
            out = fn(params, batch, jax.random.fold_in(jax.random.key(int(config.seed) + 7), i))
            metrics = jax.device_get(out["metrics"])
            for k, v in metrics.items():
                if k == "loss" or k.endswith("_mse_loss"):
                    name = "loss" if k == "loss" else f"{k[: -len('_mse_loss')]}_loss"
                    sums[name] = sums.get(name, 0.0) + float(v) * b
            n += b
        return {k: v / n for k, v in sums.items()} if n else {}

    def visualize(self, model, params, batch, rng, path) -> None:
        """PNG: per view input / masked input / reconstruction (SAX: the middle non-empty slice)."""
        import jax
        import jax.numpy as jnp

        from cinema_jax import viz
        from cinema_jax.models.patchify import reconstruct, unpatchify

        first = {k: np.asarray(v) for k, v in batch.items()}  # whole batch: reuses the eval compile
        out = self._eval_fn(model)(params, first, rng)
        panels = {}
        for view in model.views:
            if view not in first:
                continue
            image = first[view]
            patch = model.dec_patch(view)
            grid = tuple(s // p for s, p in zip(image.shape[1:-1], patch))
            mask = np.asarray(jax.device_get(out["mask"][view]))
            recon = np.asarray(reconstruct(jnp.asarray(image), out["pred"][view], jnp.asarray(mask), patch))
            keep = np.repeat((~mask)[..., None], int(np.prod(patch)) * image.shape[-1], axis=-1).astype(np.float32)
            masked = np.asarray(unpatchify(jnp.asarray(np.asarray(out["target"][view]) * keep), patch, grid))
            sel = (0, Ellipsis, 0)
            img, msk, rec = image[sel], masked[sel], recon[sel]
            if img.ndim == 3:  # SAX: a middle slice that holds data
                filled = np.flatnonzero(img.reshape(-1, img.shape[-1]).max(axis=0) > 0)
                z = int(filled[len(filled) // 2]) if filled.size else img.shape[-1] // 2
                img, msk, rec = img[..., z], msk[..., z], rec[..., z]
            panels[view] = (img, msk, np.clip(rec, 0.0, 1.0))
        viz.mae_reconstruction_png(path, panels)


TASK = PretrainMAE()
