"""Imaging transformer: shapes, block strings, window geometry, attention locality, tiling, sizes, sharding names,
dtype and remat. Parity with the reference weights: test_snraware_parity.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.models.imaging_transformer import (
    SIZES,
    Attention,
    Geometry,
    level_sizes,
    make_model,
    num_params,
    parse_block_str,
    tile_starts,
)


def _params(model, shape):
    """Jitted init with an RBG key: XLA on CPU compiles the threefry initialisers of every parameter ~5x slower than
    the model itself (30-60 s for 'tiny'); RBG gives the same parameter tree in a few seconds."""
    return jax.jit(lambda: model.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros(shape), train=False))()


@pytest.fixture(scope="module")
def tiny():
    """backbone -> (tiny model, params), initialised once per module (the parameter tree depends on the model's
    `image_size`, not on the input size: inputs are tiled / padded to it)."""
    cache = {}

    def get(backbone, **kw):
        key = (backbone, tuple(sorted(kw.items())))
        if key not in cache:
            model = make_model("tiny", backbone=backbone, **kw)
            cache[key] = model, _params(model, (1, 16, 16, 4, 3))
        return cache[key]

    return get


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def test_parse_block_str():
    assert parse_block_str("T1L1G1") == ["T", "L", "G"]
    assert parse_block_str("T1L1G1T1L1G1") == ["T", "L", "G"] * 2
    assert parse_block_str("T2") == ["T"]  # the digit is the reference's mixer flag, not a repeat count
    for bad in ("T1X1", "L3", "T", "T1L"):
        with pytest.raises(ValueError):
            parse_block_str(bad)


def test_window_geometry_follows_the_reference():
    # released small (64x64 cutout, window 8, patch 4): sizes the reference builds (fixture README)
    s = level_sizes((64, 64), (8, 8), (4, 4), 2, "hrnet")
    assert set(s) == {"B00", "B01", "B11", "output_B0", "output_B1"}
    assert s["B00"] == (64, 64, Geometry((2, 2), (4, 4), (16, 16), (4, 4)))
    assert s["output_B1"] == (32, 32, Geometry((2, 2), (4, 4), (8, 8), (4, 4)))
    # U-Net bridge of the 16x16 fixture (window 4, patch 2): the window shrinks to fit the 4x4 map
    u = level_sizes((16, 16), (4, 4), (2, 2), 2, "unet")
    assert u["bridge"] == (4, 4, Geometry((2, 2), (1, 1), (4, 4), (1, 1)))
    with pytest.raises(ValueError, match="resolution levels"):
        level_sizes((64, 64), (8, 8), (4, 4), 3, "hrnet")


@pytest.mark.parametrize("backbone,levels", [("hrnet", 2), ("unet", 1)])  # 2-level U-Net: parity test (eval)
def test_forward_shape_and_grad(tiny, backbone, levels):
    model, v = tiny(backbone, block_str=("T1L1G1",) * levels)
    x = jax.random.normal(jax.random.key(1), (2, 32, 16, 6, 3))

    def loss(p):  # train mode (stochastic depth on): forward and gradient from one compile
        y = model.apply(p, x, train=True, rngs={"droppath": jax.random.key(2)})
        return jnp.mean(y ** 2), y

    (value, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(v)
    assert y.shape == (2, 32, 16, 6, 2) and y.dtype == jnp.float32
    assert np.isfinite(float(value)) and float(value) > 0
    leaves = [np.asarray(a) for a in jax.tree.leaves(nn.meta.unbox(g))]
    assert all(np.isfinite(a).all() for a in leaves)
    assert sum(float(np.abs(a).sum()) for a in leaves) > 0


def _response(mode, grid, x_shape, probe):
    """Which output positions change when the input changes at `probe` (t, x, y); Attention works on the model's
    inner layout (B, T, X, Y, C). Returns a (T, X, Y) mask."""
    att = Attention(mode, 4, 2, grid=grid, patch=(2, 2))
    x = jax.random.normal(jax.random.key(0), x_shape)
    p = att.init(jax.random.key(1), x)
    x2 = x.at[(0, *probe)].add(5.0)
    d = jnp.abs(att.apply(p, x2) - att.apply(p, x)).sum(axis=(0, -1))
    return np.asarray(d > 1e-6)


def test_attention_patterns_see_the_right_neighbourhood():
    shape = (1, 4, 16, 16, 4)
    loc = _response("local", (2, 2), shape, (2, 1, 1))  # windows of 2x2 patches of 2x2 pixels
    assert not loc[[0, 1, 3]].any()  # spatial attention stays within the frame
    assert loc[2][8:, 8:].sum() == 0  # local: nothing outside the 4x4 window (+ conv halos)
    glob = _response("global", (4, 4), shape, (2, 1, 1))  # 4x4 windows
    assert glob[2][12:, 12:].any()  # global: reaches a far window
    temp = _response("temporal", (2, 2), shape, (2, 5, 5))
    assert temp[0].any() and temp[3].any()  # temporal: reaches other frames


def test_inputs_are_tiled_to_the_model_size():
    assert tile_starts(64, 64, 16) == [0] and tile_starts(40, 64, 16) == [0]
    assert tile_starts(128, 64, 16) == [0, 48, 64] and tile_starts(24, 16, 4) == [0, 8]
    model = make_model("tiny", image_size=(16, 16), block_str=("T1L1G1",))
    v = _params(model, (1, 16, 16, 2, 3))
    f = jax.jit(model.apply)
    x = jax.random.normal(jax.random.key(4), (1, 24, 16, 2, 3))
    y, a, b = f(v, x), f(v, x[:, :16]), f(v, x[:, 8:])
    assert y.shape == (1, 24, 16, 2, 2)
    np.testing.assert_allclose(y[:, :8], a[:, :8], atol=1e-5)  # rows only the first tile covers
    np.testing.assert_allclose(y[:, 16:], b[:, 8:], atol=1e-5)  # rows only the second tile covers
    np.testing.assert_allclose(y[:, 8:16], (a[:, 8:] + b[:, :8]) / 2, atol=1e-5)  # overlap: the average
    small = x[:, :12, :10]  # smaller than a tile: reflect-padded, then cropped
    padded = jnp.pad(small, ((0, 0), (0, 4), (0, 6), (0, 0), (0, 0)), mode="reflect")
    np.testing.assert_allclose(f(v, small), f(v, padded)[:, :12, :10], atol=1e-5)


def test_sizes_and_logical_names():
    # reference parameter counts (64x64 cutout) of the released HRNet denoisers (small: test_snraware_parity.py)
    v = jax.eval_shape(lambda: _params(make_model("small"), (1, 64, 64, 16, 3)))
    assert _count(v["params"]) == 27_701_329
    assert num_params(make_model("medium")) == 55_110_688
    specs = nn.get_partition_spec(v)["params"]
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]
    names = {name for _, spec in flat for name in spec if name}
    assert {"embed", "heads", "mlp"} <= names
    assert set(SIZES) >= {"tiny", "small", "medium", "large"}


def test_bf16_and_remat_match_float32():
    one_level = dict(block_str=("T1L1G1",), image_size=(16, 16))  # three compiles: keep the graph small
    x = jax.random.normal(jax.random.key(3), (1, 16, 16, 4, 3))
    m32 = make_model("tiny", **one_level)
    v = _params(m32, x.shape)

    def f32(p):
        y = m32.apply(p, x)
        return y.sum(), y

    (_, y32), ygr = jax.jit(jax.value_and_grad(f32, has_aux=True))(v)
    y16 = jax.jit(make_model("tiny", dtype=jnp.bfloat16, **one_level).apply)(v, x)
    yre = jax.jit(jax.grad(lambda p: make_model("tiny", remat="block", **one_level).apply(p, x).sum()))(v)
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(yre)), jax.tree.leaves(nn.meta.unbox(ygr)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert y16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.1 * float(jnp.max(jnp.abs(y32))) + 0.05
