"""Picture helpers: overlays, landmarks, grids, atomic PNG / GIF writers, training figures, synthetic preview."""

import numpy as np
import pytest
from PIL import Image

from cinema_jax import viz
from cinema_jax.data import phantom as P


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def test_overlay_colours_and_transpose():
    img = np.zeros((40, 30), np.float32)
    img[:, 15:] = 1.0  # bright for y >= 15
    lab = np.zeros((40, 30), np.uint8)
    lab[5, 20] = 3
    lab[30, 2] = 1
    rgb = viz.overlay_labels(img, lab, alpha=0.5)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8  # (Y, X, 3): y down the rows
    assert rgb[20, 5, 0] > rgb[20, 5, 2]  # LV red-ish
    assert rgb[2, 30, 2] > rgb[2, 30, 0]  # RV blue-ish
    assert np.all(rgb[0, 0] == 0) and np.all(rgb[29, 0] == 255)  # untouched gray, transposed
    with pytest.raises(ValueError):
        viz.overlay_labels(img, lab[:10])


def test_draw_landmarks_marks_points():
    rgb = np.zeros((50, 60, 3), np.uint8)
    out = viz.draw_landmarks(rgb, [[10, 20], [59, 49], [-5, 3]])  # last one outside: ignored
    assert np.any(out[20, 10] > 0) and np.any(out[49, 59] > 0)
    assert np.all(rgb == 0)  # input untouched


def test_image_grid_tiles_and_pads():
    panels = [[np.random.rand(20, 10), np.random.rand(30, 10)], [np.zeros((12, 12, 3), np.uint8)]]
    grid = viz.image_grid(panels, titles=["a", "b"], pad=2)
    assert grid.dtype == np.uint8 and grid.ndim == 3
    # widths: 2 + 20 + 2 + 30 + 2 ; heights: 2 + 14 + 10 + 2 + 14 + 12 + 2
    assert grid.shape == (56, 56, 3)


def test_save_png_and_gif_atomic(tmp_path, monkeypatch):
    rgb = viz.overlay_labels(np.random.rand(64, 48), (np.random.rand(64, 48) * 4).astype(np.uint8))
    viz.save_png(tmp_path / "a.png", rgb)
    viz.save_png(tmp_path / "g.png", np.random.rand(64, 48))
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (64, 48) and im.mode == "RGB"
    with Image.open(tmp_path / "g.png") as im:
        arr = np.asarray(im)
        assert arr.shape == (48, 64, 3) and arr.std() > 0
    frames = [np.random.rand(32, 16) for _ in range(5)]
    viz.save_gif(tmp_path / "c.gif", frames, fps=5)
    with Image.open(tmp_path / "c.gif") as im:
        assert im.size == (32, 16) and im.n_frames == 5
    assert _no_temp_files(tmp_path)
    with pytest.raises(ValueError):
        viz.save_png(tmp_path / "bad.png", np.zeros((4, 4, 4, 4)))
    # a write that dies half-way leaves neither the target nor a temporary file behind
    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        viz.save_png(tmp_path / "bad.png", rgb)
    assert not (tmp_path / "bad.png").exists() and _no_temp_files(tmp_path)


def test_mae_and_volume_figures(tmp_path):
    panels = {v: (np.random.rand(32, 32), np.random.rand(32, 32), np.random.rand(32, 32)) for v in ("sax", "lax_4c")}
    viz.mae_reconstruction_png(tmp_path / "mae.png", panels)
    viz.volume_curve_png(tmp_path / "vol.png", {"LV": np.array([150, 120, 60, 90, 140.0]), "RV": np.ones(5)},
                         title="curves")
    for name in ("mae.png", "vol.png"):
        with Image.open(tmp_path / name) as im:
            arr = np.asarray(im.convert("RGB"))
            assert arr.shape[0] > 200 and arr.shape[1] > 300 and arr.std() > 5
    assert _no_temp_files(tmp_path)


def test_synthetic_preview(tmp_path):
    cfg = P.PhantomConfig(sax_size=(96, 96), sax_spacing=(2.0, 2.0, 10.0), lax_size=(128, 128),
                          lax_spacing=(2.0, 2.0), n_frames=10)
    path = tmp_path / "preview.png"
    viz.write_synthetic_preview(path, seed=1, phenotypes=["NOR", "HCM"], cfg=cfg)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    # 2 phenotypes x (ED, ES) rows of 4 SAX + 3 LAX panels
    assert arr.shape[0] > 4 * 96 and arr.shape[1] > 4 * 96 + 3 * 128
    red = (arr[..., 0] > arr[..., 1] + 40) & (arr[..., 0] > arr[..., 2] + 40)
    assert red.sum() > 500  # LV overlays present
    assert _no_temp_files(tmp_path)
