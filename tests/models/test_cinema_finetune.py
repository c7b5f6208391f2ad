"""ConvViT / ConvUNetR / landmarks / transfer helpers / pos-embed: shapes, counts, surgery, interpolation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.errors import CheckpointError
from cinema_jax.models import (
    build_convunetr,
    build_convvit,
    build_mae,
    heatmap_soft_argmax,
    landmark_heatmaps,
    layer_decay_groups,
    load_encoder,
)
from cinema_jax.models.patchify import patchify, unpatchify
from cinema_jax.models.pos_embed import interpolate_table, pos_embed_for_grid, sincos_pos_embed

TINY = {"size": "tiny", "conv_chans": [4, 8], "image_size": {"sax": [32, 32, 2], "lax_4c": [32, 32]}}


def _shapes(model, images):
    return jax.eval_shape(lambda x: nn.meta.unbox(model.init(
        {"params": jax.random.key(0), "mask": jax.random.key(1)}, x)["params"]), images)


def _random(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _spec(shape, c=1):
    return jax.ShapeDtypeStruct((1, *shape, c), jnp.float32)


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("kind, views, chans, out, expected", [
    ("convunetr", ["sax"], 1, 4, 125_621_222),
    ("convunetr", ["lax_4c"], 1, 4, 101_970_854),
    ("convvit", ["sax"], 2, 5, 87_729_354),
])
def test_base_param_counts(kind, views, chans, out, expected):
    build = build_convunetr if kind == "convunetr" else build_convvit
    model = build({"views": views, "out_chans": out})
    images = {v: _spec((192, 192, 16) if v == "sax" else (256, 256), chans) for v in views}
    assert _count(_shapes(model, images)) == expected


def test_tiny_forward_shapes_and_reductions():
    images = {"sax": jnp.ones((2, 32, 32, 2, 2))}
    model = build_convvit(dict(TINY, views=["sax"], out_chans=3, reduce="cls"))
    params = _random(_shapes(model, images))
    assert "pred_head_sax" in params  # every head exists whatever the reduction
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, images), params)
    assert logits.shape == (2, 3)
    seg = build_convunetr(dict(TINY, views=["lax_4c"], out_chans=4, dec_chans=[4, 8, 8, 16, 16], dropout=0.1))
    img = {"lax_4c": jnp.ones((1, 32, 32, 1))}
    sp = _random(_shapes(seg, img))
    assert {"dec_conv_blocks_lax_4c_3", "dec_down_blocks_lax_4c_0", "decoder_lax_4c"} <= set(sp)
    res = jax.eval_shape(lambda p, k: seg.apply({"params": p}, img, train=True, rngs={"dropout": k}), sp,
                         jax.random.key(1))
    assert res["lax_4c"].shape == (1, 32, 32, 4)


def test_convunetr_full_remat_same_gradients_less_memory():
    """remat='full' recomputes every ConvResBlock (the decoder's full-resolution blocks hold most of a seg step's
    activations): same parameter tree and gradients, smaller compiled temp memory for the backward."""
    cfg = dict(TINY, views=["lax_4c"], image_size={"lax_4c": [64, 64]}, out_chans=4, dec_chans=[8, 8, 8, 16, 16],
               dropout=0.1)  # the recompute must redraw the same dropout masks for the gradients to match
    images = {"lax_4c": jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 1)), jnp.float32)}
    shapes = _shapes(build_convunetr(cfg), images)
    params = _random(shapes)

    def step(remat):
        model = build_convunetr(cfg, remat=remat)
        assert jax.tree_util.tree_structure(_shapes(model, images)) == jax.tree_util.tree_structure(shapes)
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, images, train=True,  # noqa: E731
                                                          rngs={"dropout": jax.random.key(3)})["lax_4c"]))
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled(params), compiled.memory_analysis().temp_size_in_bytes

    ref, temp_none = step("none")
    grads, temp_full = step("full")
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert temp_full < 0.6 * temp_none, (temp_full, temp_none)  # measured 0.42


def test_load_encoder_repeats_first_kernel_and_drops_decoder():
    mae = build_mae(dict(TINY, views=["sax", "lax_4c"]))
    src = _shapes(mae, {"sax": _spec((32, 32, 2)), "lax_4c": _spec((32, 32))})
    rng = np.random.default_rng(0)
    src = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), src)
    clf = build_convvit(dict(TINY, views=["sax"], out_chans=5))
    tgt_boxed = jax.eval_shape(lambda: clf.init({"params": jax.random.key(0)}, {"sax": jnp.zeros((1, 32, 32, 2, 2))}))
    tgt = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(tgt_boxed["params"]))
    out = load_encoder({"params": src}, tgt)
    k_src = src["enc_down_sax"]["conv_blocks_0"]["patch_embed"]["conv"]["kernel"]
    k_out = out["enc_down_sax"]["conv_blocks_0"]["patch_embed"]["conv"]["kernel"]
    assert k_src.shape[-2] == 1 and k_out.shape[-2] == 2
    np.testing.assert_array_equal(k_out[..., 0, :], k_src[..., 0, :])
    np.testing.assert_array_equal(k_out[..., 1, :], k_src[..., 0, :])
    np.testing.assert_array_equal(out["encoder"]["blocks_0"]["attn"]["q"]["kernel"],
                                  src["encoder"]["blocks_0"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(out["enc_fusion_sax"]["norm"]["scale"], src["enc_fusion_sax"]["norm"]["scale"])
    assert "decoder" not in out and "enc_down_lax_4c" not in out
    assert not np.any(out["pred_head_cls"]["kernel"])  # heads untouched
    # a boxed target keeps its boxes
    boxed_out = load_encoder(src, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tgt_boxed["params"]))
    assert isinstance(boxed_out["encoder"]["cls_token"], nn.meta.AxisMetadata)
    with pytest.raises(CheckpointError, match="lax_2c"):
        other = build_convvit(dict(TINY, views=["lax_2c"], image_size={"lax_2c": [32, 32]}, out_chans=5))
        t2 = _shapes(other, {"lax_2c": _spec((32, 32))})
        load_encoder(src, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), t2))


def test_layer_decay_groups():
    model = build_convvit({"views": ["lax_4c"], "out_chans": 2, "size": "tiny", "conv_chans": [4, 8],
                           "enc_depth": 3, "image_size": {"lax_4c": [32, 32]}})
    groups = layer_decay_groups(_shapes(model, {"lax_4c": _spec((32, 32))}))
    assert groups["enc_down_lax_4c"]["linear"]["kernel"] == 0
    assert groups["enc_fusion_lax_4c"]["norm"]["scale"] == 0
    assert groups["encoder"]["cls_token"] == 0
    assert groups["encoder"]["blocks_2"]["mlp"]["fc1"]["kernel"] == 3
    assert groups["encoder"]["norm"]["scale"] == 4 and groups["pred_head_cls"]["bias"] == 4


def test_pos_embed_axis_order_and_interpolation():
    pe = sincos_pos_embed(24, (3, 3))  # 2D: 12 per axis, the first chunk encodes the y (axis-1) index
    token = 1 * 3 + 2  # (x=1, y=2)
    np.testing.assert_allclose(pe[token, 0], np.sin(2.0), atol=1e-6)
    np.testing.assert_allclose(pe[token, 12], np.sin(1.0), atol=1e-6)
    np.testing.assert_allclose(interpolate_table(np.ones((16, 5)), (4, 4), (6, 3)), 1.0, atol=1e-6)
    np.testing.assert_allclose(interpolate_table(np.ones((32, 5)), (4, 4, 2), (8, 2, 3)), 1.0, atol=1e-6)
    assert pos_embed_for_grid(24, (4, 4), (4, 4)) is sincos_pos_embed(24, (4, 4))
    lin = np.arange(4, dtype=np.float32).repeat(2).reshape(8, 1)  # grid (4, 2): value = x
    up = interpolate_table(lin, (4, 2, 1), (8, 2, 1)).reshape(8, 2)[:, 0]
    np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)  # torch trilinear
    # a model configured for 32x32 runs on 48x48 inputs (interpolated pos-embed)
    model = build_convvit(dict(TINY, views=["lax_4c"], out_chans=2))
    out = jax.eval_shape(lambda: model.init_with_output({"params": jax.random.key(0)},
                                                        {"lax_4c": jnp.zeros((1, 48, 48, 1))})[0])
    assert out.shape == (1, 2)


def test_patchify_roundtrip_and_order():
    x = jnp.arange(2 * 4 * 6 * 2 * 3, dtype=jnp.float32).reshape(2, 4, 6, 2, 3)
    t = patchify(x, (2, 3, 1))
    assert t.shape == (2, 2 * 2 * 2, 2 * 3 * 1 * 3)
    np.testing.assert_array_equal(unpatchify(t, (2, 3, 1), (2, 2, 2)), x)
    np.testing.assert_array_equal(t[0, 1], x[0, 0:2, 0:3, 1, :].reshape(-1))  # token 1 = (x0, y0, z1)


def test_heatmap_soft_argmax_and_targets():
    coords = jnp.asarray([[[5.0, 9.0], [20.0, 3.0], [12.0, 12.0]]])
    maps = landmark_heatmaps(coords, (24, 16), sigma=3.0)
    assert maps.shape == (1, 24, 16, 3)
    np.testing.assert_allclose(heatmap_soft_argmax(maps), coords, atol=1e-3)
