"""Imaging transformer: shapes, block strings, attention locality, sizes, sharding names, dtype and remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.models.imaging_transformer import SIZES, Attention, make_model, parse_block_str


def _params(model, shape):
    """Jitted init with an RBG key: XLA on CPU compiles the threefry initialisers of every parameter ~5x slower than
    the model itself (30-60 s for 'tiny'); RBG gives the same parameter tree in a few seconds."""
    return jax.jit(lambda: model.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros(shape), train=False))()


@pytest.fixture(scope="module")
def tiny():
    """backbone -> (tiny model, params), initialised once per module (the parameter tree does not depend on the
    image size as long as every level tiles into the 8x8 window, true for all shapes used here)."""
    cache = {}

    def get(backbone):
        if backbone not in cache:
            model = make_model("tiny", backbone=backbone)
            cache[backbone] = model, _params(model, (1, 16, 16, 4, 3))
        return cache[backbone]

    return get


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def test_parse_block_str():
    assert parse_block_str("T1L1G1") == ["T", "L", "G"]
    assert parse_block_str("T2C1") == ["T", "T", "C"]
    with pytest.raises(ValueError):
        parse_block_str("T1X1")


@pytest.mark.parametrize("backbone", ["hrnet", "unet"])
def test_forward_shape_and_grad(tiny, backbone):
    model, v = tiny(backbone)
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


def _response(mode, x_shape, probe):
    """Which output positions change when the input changes at `probe` (x, y, t)."""
    att = Attention(mode, 4, 2, window=(4, 4), patch=(2, 2))
    x = jax.random.normal(jax.random.key(0), x_shape)
    p = att.init(jax.random.key(1), x)
    x2 = x.at[(0, *probe)].add(5.0)
    d = jnp.abs(att.apply(p, x2) - att.apply(p, x)).sum(axis=(0, -1))  # (X, Y, T)
    return np.asarray(d > 1e-6)


def test_attention_patterns_see_the_right_neighbourhood():
    shape = (1, 16, 16, 4, 4)
    loc = _response("local", shape, (1, 1, 2))
    assert not loc[..., [0, 1, 3]].any()  # spatial attention stays within the frame
    assert loc[:, :, 2][8:, 8:].sum() == 0  # local: nothing outside the 4x4 window (+3x3 conv halo)
    glob = _response("global", shape, (1, 1, 2))
    assert glob[:, :, 2][12:, 12:].any()  # global: reaches a far window
    temp = _response("temporal", shape, (5, 5, 2))
    assert temp[..., 0].any() and temp[..., 3].any()  # temporal: reaches other frames


def test_sizes_and_logical_names():
    model = make_model("small")
    v = jax.eval_shape(lambda: _params(model, (1, 64, 64, 16, 3)))
    n = _count(v["params"])
    assert 10e6 < n < 40e6  # reference small: 27.7 M
    assert _count(jax.eval_shape(lambda: _params(make_model("medium"), (1, 64, 64, 16, 3)))["params"]) > 1.8 * n
    specs = nn.get_partition_spec(v)["params"]
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]
    names = {name for _, spec in flat for name in spec if name}
    assert {"embed", "heads", "mlp"} <= names
    assert set(SIZES) >= {"tiny", "small", "medium", "large"}


def test_bf16_and_remat_match_float32(tiny):
    x = jax.random.normal(jax.random.key(3), (1, 16, 16, 4, 3))
    m32, v = tiny("hrnet")

    def f32(p):
        y = m32.apply(p, x)
        return y.sum(), y

    (_, y32), ygr = jax.jit(jax.value_and_grad(f32, has_aux=True))(v)
    y16 = jax.jit(make_model("tiny", dtype=jnp.bfloat16).apply)(v, x)
    yre = jax.jit(jax.grad(lambda p: make_model("tiny", remat="block").apply(p, x).sum()))(v)
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(yre)), jax.tree.leaves(nn.meta.unbox(ygr)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert y16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.1 * float(jnp.max(jnp.abs(y32))) + 0.05
