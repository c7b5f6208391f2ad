"""CineMA MAE: masks (injected / sampled), view subsets, sizes, logical names, base parameter count."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.models import SIZES, build_mae
from cinema_jax.models.patchify import n_keep_for

CFG = {"size": "tiny", "views": ["sax", "lax_2c", "lax_4c"], "conv_chans": [4, 8],
       "image_size": {"sax": [32, 32, 2], "lax_2c": [32, 32], "lax_4c": [32, 32]}}
N = {"sax": 8, "lax_2c": 4, "lax_4c": 4}


def _images(batch=2, views=CFG["views"], seed=0):
    rng = np.random.default_rng(seed)
    return {v: jnp.asarray(rng.random((batch, *CFG["image_size"][v], 1)), jnp.float32) for v in views}


def _random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny():
    """Boxed param shapes (eval_shape: no init compile) and random params of a tiny 3-view MAE."""
    model = build_mae(CFG)
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, _images()))
    return model, boxed["params"], _random_params(nn.meta.unbox(boxed["params"]))


def test_boxed_params_carry_logical_names(tiny):
    _, boxed, _ = tiny
    spec = nn.get_partition_spec(boxed)
    attn = spec["encoder"]["blocks_0"]["attn"]
    assert tuple(attn["q"]["kernel"]) == ("embed", "heads")
    assert tuple(attn["kv"]["kernel"]) == ("embed", "kv")
    assert tuple(attn["proj"]["kernel"]) == ("heads", "embed")
    assert tuple(spec["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(spec["decoder"]["blocks_0"]["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")
    dw = spec["enc_down_sax"]["conv_blocks_0"]["conv_0"]["dw_conv"]["kernel"]
    assert tuple(dw) == (None, None, None, "conv_in", "conv_out")


def test_sampled_then_injected_masks(tiny):
    model, _, params = tiny
    images = _images(batch=3)
    run = jax.jit(lambda p, k: model.apply({"params": p}, images, train=True, rngs={"mask": k, "droppath": k}))
    out = run(params, jax.random.key(5))
    for v, n in N.items():
        m = np.asarray(out["mask"][v])
        assert m.shape == (3, n) and m.dtype == bool
        assert ((~m).sum(1) == n_keep_for(n, 0.75)).all()
        assert out["pred"][v].shape == (3, n - n_keep_for(n, 0.75), 256)
    other = run(params, jax.random.key(6))
    assert any(not np.array_equal(out["mask"][v], other["mask"][v]) for v in N)
    assert np.isfinite(float(out["loss"]))
    per_view = [float(out["metrics"][f"{v}_mse_loss"]) for v in N]  # per-view mean, then mean over views
    assert float(out["loss"]) == pytest.approx(np.mean(per_view), rel=1e-6)

    # the same masks injected (traced under jit: the visible count comes from mask_ratio) give the same outputs
    inj = jax.jit(lambda p, m: model.apply({"params": p}, images, mask=m, train=False,
                                           rngs={"mask": jax.random.key(99)}))(params, out["mask"])
    for v in N:
        np.testing.assert_array_equal(out["mask"][v], inj["mask"][v])
        np.testing.assert_allclose(out["pred"][v], inj["pred"][v], atol=1e-5)
    tgt = np.asarray(inj["target"]["lax_2c"])  # target = patchified input, x-major tokens
    np.testing.assert_array_equal(tgt[0, 0], np.asarray(images["lax_2c"])[0, :16, :16, 0].reshape(-1))
    np.testing.assert_array_equal(tgt[0, 1], np.asarray(images["lax_2c"])[0, :16, 16:, 0].reshape(-1))


def test_view_subset_and_features(tiny):
    model, _, params = tiny
    images = _images(views=["lax_4c"])

    @jax.jit
    def run(p):
        out = model.apply({"params": p}, images, rngs={"mask": jax.random.key(0)})
        return out, model.apply({"params": p}, images, method=type(model).features)

    out, feats = run(params)
    assert sorted(out["pred"]) == ["lax_4c"] and sorted(feats) == ["cls", "lax_4c"]
    assert feats["cls"].shape == (2, 1, 16) and feats["lax_4c"].shape == (2, 4, 16)
    with pytest.raises(ValueError, match="not configured"):
        jax.eval_shape(lambda: model.apply({"params": params}, {"lax_3c": jnp.zeros((1, 32, 32, 1))},
                                           rngs={"mask": jax.random.key(0)}))


def test_norm_target_and_bf16_remat_run():
    cfg = dict(CFG, views=["lax_4c"], norm_target=True)
    model = build_mae(cfg, dtype="bfloat16", remat="block")
    images = _images(views=["lax_4c"])
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(rngs, images)["params"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))  # params stay f32
    params = _random_params(shapes)
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, train=True,
                                                  rngs={"mask": jax.random.key(2)})["loss"]))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grad))


def test_remat_policies_give_the_same_gradients():
    cfg = dict(CFG, views=["lax_4c"])
    images = _images(views=["lax_4c"])
    shapes = jax.eval_shape(lambda: nn.meta.unbox(build_mae(cfg).init(
        {"params": jax.random.key(0), "mask": jax.random.key(1)}, images)["params"]))
    params = _random_params(shapes)

    def grads(remat):
        model = build_mae(cfg, remat=remat)
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, train=True,
                                                      rngs={"mask": jax.random.key(2)})["loss"]))(params)

    ref = jax.tree_util.tree_leaves(grads("none"))
    for remat in ("block", "dots", "full"):
        for a, b in zip(jax.tree_util.tree_leaves(grads(remat)), ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat must be"):
        build_mae(cfg, remat="selective").init({"params": jax.random.key(0), "mask": jax.random.key(1)}, images)


def test_sizes_table_matches_reference():
    assert SIZES["base"] == dict(enc_embed_dim=768, enc_depth=12, enc_n_heads=12, dec_embed_dim=512, dec_depth=8,
                                 dec_n_heads=16)
    assert SIZES["large"]["enc_embed_dim"] == 1024 and SIZES["huge"]["enc_depth"] == 32
    assert SIZES["tiny"]["enc_embed_dim"] == 16


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def test_base_mae_param_count_eval_shape():
    model = build_mae({"size": "base"})
    images = {v: jax.ShapeDtypeStruct((1, 192, 192, 16, 1) if v == "sax" else (1, 256, 256, 1), jnp.float32)
              for v in model.views}
    shapes = jax.eval_shape(lambda x: nn.meta.unbox(
        model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, x)["params"]), images)
    assert _count(shapes) == 121_738_240
    assert _count(shapes["encoder"]) == 85_056_768
    assert _count(shapes["enc_down_sax"]) == 1_481_152 and _count(shapes["enc_down_lax_2c"]) == 1_442_752
    assert _count(shapes["enc_fusion_sax"]) == 1_182_720
    assert _count(shapes["decoder"]) == 25_220_096
