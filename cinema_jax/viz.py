"""Pictures for humans: label overlays, landmark crosses, grids, PNG / GIF writers, training figures.

Image arrays follow the package layout (X, Y) with x the FIRST axis; every function here displays them transposed,
so x runs left -> right along the columns and y runs top -> bottom down the rows. Points are (x, y) in pixel
coordinates of that (X, Y) array. Outputs are uint8 RGB arrays (rows, cols, 3) = (Y, X, 3) ready to save.
All files are written atomically through `cinema_jax.fileutil.atomic_path`. matplotlib (Agg) is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cinema_jax.fileutil import atomic_path

# RV, MYO, LV colours (ACDC label order 1, 2, 3); label 0 (background) is left untouched.
LABEL_COLOURS = np.array([[0, 0, 0], [66, 135, 245], [46, 204, 64], [230, 57, 70]], np.uint8)
LANDMARK_COLOURS = np.array([[255, 220, 0], [255, 140, 0], [255, 0, 255]], np.uint8)


def _to_uint8_gray(image2d: np.ndarray) -> np.ndarray:
    """(X, Y) float -> (Y, X) uint8, min-max scaled (constant images become black)."""
    img = np.asarray(image2d, np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image (X, Y), got shape {img.shape}")
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return np.clip(np.round(scaled.T * 255), 0, 255).astype(np.uint8)


def _as_rgb(panel: np.ndarray) -> np.ndarray:
    """A panel that is already RGB (rows, cols, 3) uint8 is kept; a 2-D (X, Y) image is transposed to gray RGB."""
    arr = np.asarray(panel)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr.astype(np.uint8, copy=False)
    gray = _to_uint8_gray(arr)
    return np.repeat(gray[..., None], 3, axis=-1)


def overlay_labels(image2d: np.ndarray, label2d: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend class colours (RV blue, MYO green, LV red) over a gray image.

    image2d, label2d: (X, Y). Returns uint8 RGB (Y, X, 3) (displayed transposed, y down the rows).
    """
    rgb = _as_rgb(image2d).astype(np.float32)
    lab = np.asarray(label2d).T
    if lab.shape != rgb.shape[:2]:
        raise ValueError(f"label shape {np.asarray(label2d).shape} does not match image {np.asarray(image2d).shape}")
    lab = np.clip(lab.astype(np.int64), 0, len(LABEL_COLOURS) - 1)
    colour = LABEL_COLOURS[lab].astype(np.float32)
    mask = (lab > 0)[..., None]
    out = np.where(mask, (1 - alpha) * rgb + alpha * colour, rgb)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_landmarks(rgb: np.ndarray, points_xy, size: int = 4) -> np.ndarray:
    """Draw a cross per point (x, y pixel coordinates of the (X, Y) image) on an RGB (Y, X, 3) array (copy)."""
    out = _as_rgb(rgb).copy()
    h, w = out.shape[:2]
    for i, (x, y) in enumerate(np.asarray(points_xy, np.float64).reshape(-1, 2)):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        col = LANDMARK_COLOURS[i % len(LANDMARK_COLOURS)]
        cx, cy = int(round(x)), int(round(y))
        for d in range(-size, size + 1):
            for px, py in ((cx + d, cy), (cx, cy + d)):
                if 0 <= px < w and 0 <= py < h:
                    out[py, px] = col
    return out


def image_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None, pad: int = 4,
               scale: int = 1) -> np.ndarray:
    """Tile panels (2-D (X, Y) images or RGB (rows, cols, 3)) into one uint8 RGB array with `pad` px gaps.

    Panels of unequal size are top-left aligned in cells sized by the largest panel in their row / column.
    `titles` (one per row) are drawn as a text strip above each row when given.
    """
    rgb_rows = [[_as_rgb(p) for p in row] for row in rows]
    if not rgb_rows or not any(rgb_rows):
        raise ValueError("image_grid needs at least one panel")
    n_cols = max(len(r) for r in rgb_rows)
    col_w = [max((r[j].shape[1] for r in rgb_rows if j < len(r)), default=0) for j in range(n_cols)]
    row_h = [max(p.shape[0] for p in r) if r else 0 for r in rgb_rows]
    title_h = 14 if titles else 0
    total_h = sum(row_h) + len(rgb_rows) * (pad + title_h) + pad
    total_w = sum(col_w) + (n_cols + 1) * pad
    canvas = np.full((total_h, total_w, 3), 16, np.uint8)
    y = pad
    for i, row in enumerate(rgb_rows):
        if titles:
            _draw_text(canvas, titles[i] if i < len(titles) else "", pad, y)
            y += title_h
        x = pad
        for j, p in enumerate(row):
            canvas[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += col_w[j] + pad
        y += row_h[i] + pad
    if scale > 1:
        canvas = np.repeat(np.repeat(canvas, scale, 0), scale, 1)
    return canvas


def _draw_text(canvas: np.ndarray, text: str, x: int, y: int) -> None:
    """Write a short caption into `canvas` in place with PIL's built-in bitmap font."""
    if not text:
        return
    from PIL import Image, ImageDraw

    h = min(14, canvas.shape[0] - y)
    w = canvas.shape[1] - x
    if h <= 0 or w <= 0:
        return
    strip = Image.fromarray(np.ascontiguousarray(canvas[y:y + h, x:x + w]))
    ImageDraw.Draw(strip).text((0, 1), text, fill=(235, 235, 235))
    canvas[y:y + h, x:x + w] = np.asarray(strip)


def save_png(path: str | os.PathLike, rgb_or_gray: np.ndarray) -> None:
    """Write an RGB (rows, cols, 3) uint8 array, or a 2-D (X, Y) image (transposed, min-max scaled), as PNG."""
    from PIL import Image

    arr = _as_rgb(rgb_or_gray)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")


def save_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 10) -> None:
    """Write an animated GIF (looping) of RGB (rows, cols, 3) frames or 2-D (X, Y) images."""
    from PIL import Image

    imgs = [Image.fromarray(np.ascontiguousarray(_as_rgb(f))) for f in frames]
    if not imgs:
        raise ValueError("save_gif needs at least one frame")
    with atomic_path(path) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
                     loop=0)


def _figure_to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _new_figure(figsize):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def mae_reconstruction_png(path: str | os.PathLike, panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
                           ) -> None:
    """MAE figure: one row per view, columns input / masked input / reconstruction (2-D (X, Y) arrays each)."""
    if not panels:
        raise ValueError("mae_reconstruction_png needs at least one view")
    fig = _new_figure((9, 3 * len(panels)))
    for i, (view, imgs) in enumerate(panels.items()):
        for j, (img, name) in enumerate(zip(imgs, ("input", "masked", "reconstruction"))):
            ax = fig.add_subplot(len(panels), 3, 3 * i + j + 1)
            ax.imshow(np.asarray(img, np.float32).T, cmap="gray", origin="upper")
            ax.set_title(f"{view}: {name}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    save_png(path, _figure_to_rgb(fig))


def volume_curve_png(path: str | os.PathLike, volumes_ml: dict[str, np.ndarray], title: str = "") -> None:
    """Volume (mL) over frames per structure, with EF = (max - min) / max in the legend."""
    fig = _new_figure((6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for name, vol in volumes_ml.items():
        vol = np.asarray(vol, np.float64).ravel()
        ef = 100.0 * (vol.max() - vol.min()) / vol.max() if vol.size and vol.max() > 0 else float("nan")
        ax.plot(np.arange(vol.size), vol, marker="o", ms=3, label=f"{name} (EF {ef:.1f} %)")
    ax.set_xlabel("frame")
    ax.set_ylabel("volume (mL)")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(path, _figure_to_rgb(fig))


def write_synthetic_preview(path: str | os.PathLike, seed: int = 0, phenotypes: Sequence[str] | None = None,
                            n_sax_slices: int = 4, cfg=None) -> None:
    """Preview of the built-in synthetic data: per phenotype two rows (ED, ES), columns = SAX slices (base to apex)
    then LAX 2C / 3C / 4C, with label overlays and landmark crosses (yellow / orange = mitral hinges, magenta =
    apex). Used by `cinema-jax data synth --preview OUT.png`."""
    from cinema_jax.data import phantom

    cfg = cfg or phantom.PhantomConfig()
    wanted = [p for p in (phenotypes or phantom.PHENOTYPES) if p in cfg.phenotypes]
    rows, titles = [], []
    for pname in wanted:
        index = next(i for i in range(len(phantom.PHENOTYPES) * 2)
                     if phantom.sample_subject(seed, i, cfg).phenotype_name == pname)
        subj = phantom.sample_subject(seed, index, cfg)
        meta = phantom.subject_metadata(subj, cfg)
        frames = [meta["ed_frame"], meta["es_frame"]]
        out = phantom.render(subj, frames, cfg=cfg)
        n = subj.n_sax
        slices = [int(k) for k in np.linspace(1, n - 2, n_sax_slices).round()]
        for t, phase in enumerate(("ED", "ES")):
            row = []
            for k in slices:
                row.append(overlay_labels(out["sax"][t, :, :, k], out["sax_label"][t, :, :, k]))
            for view in phantom.LAX_VIEWS:
                rgb = overlay_labels(out[view][t], out[f"{view}_label"][t])
                row.append(draw_landmarks(rgb, out[f"{view}_landmarks"][t]))
            rows.append(row)
            titles.append(
                f"{pname} {phase} (frame {frames[t]}) site {subj.site['name']}  SAX slices {slices} | 2C 3C 4C"
                f"  LVEF {meta['lv_ef']:.0f}% EDV {meta['lv_edv']:.0f} mL  RVEF {meta['rv_ef']:.0f}%"
            )
    save_png(path, image_grid(rows, titles))
