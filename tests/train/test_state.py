"""Optimizer pieces: schedule, weight-decay mask, layer-wise lr decay, freezing."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cinema_jax.train.state import decay_mask, lr_multipliers, lr_schedule, make_optimizer

PARAMS = {
    "enc_down_sax": {"conv": {"kernel": jnp.ones((4, 4, 1, 1, 8)), "bias": jnp.ones(8)}},
    "encoder": {"cls_token": jnp.ones((1, 1, 8)),
                "blocks_0": {"mlp": {"fc1": {"kernel": jnp.ones((8, 32)), "bias": jnp.ones(32)}}},
                "blocks_1": {"norm1": {"scale": jnp.ones(8)}, "attn": {"q": {"kernel": jnp.ones((8, 8))}}},
                "norm": {"scale": jnp.ones(8)}},
    "dec_embed_sax": {"mask_token": jnp.ones((1, 1, 8))},
    "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)},
}


def optim(**over):
    base = dict(lr=1e-3, min_lr=1e-6, warmup_steps=10, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, clip_norm=5.0,
                layer_decay=0.0, schedule="cosine")
    base.update(over)
    return ml_collections.ConfigDict(base)


def test_warmup_then_cosine_to_min():
    s = lr_schedule(optim(), 110)
    assert float(s(0)) == 0 and float(s(5)) == pytest.approx(5e-4) and float(s(10)) == pytest.approx(1e-3)
    assert float(s(60)) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2, rel=1e-4)
    assert float(s(110)) == pytest.approx(1e-6)


def test_no_decay_on_biases_norms_tokens():
    m = decay_mask(PARAMS)
    assert m["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"] and m["enc_down_sax"]["conv"]["kernel"]
    assert not m["encoder"]["blocks_0"]["mlp"]["fc1"]["bias"] and not m["encoder"]["norm"]["scale"]
    assert not m["encoder"]["cls_token"] and not m["dec_embed_sax"]["mask_token"]


def test_layer_decay_and_freeze_multipliers():
    assert lr_multipliers(PARAMS, optim()) is None
    m = lr_multipliers(PARAMS, optim(layer_decay=0.5))
    # 2 blocks -> ids: stems/cls 0, blocks 1..2, rest 3; scale = 0.5 ** (3 - id)
    assert m["enc_down_sax"]["conv"]["kernel"] == 0.125 and m["encoder"]["cls_token"] == 0.125
    assert m["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"] == 0.25
    assert m["encoder"]["blocks_1"]["attn"]["q"]["kernel"] == 0.5 and m["head"]["kernel"] == 1.0
    f = lr_multipliers(PARAMS, optim(), freeze_encoder=True)
    assert f["encoder"]["norm"]["scale"] == 0 and f["enc_down_sax"]["conv"]["bias"] == 0 and f["head"]["bias"] == 1


def test_frozen_params_do_not_move_and_clipping_applies():
    cfg = ml_collections.ConfigDict(dict(optim=optim(warmup_steps=0), total_steps=10, freeze_encoder=True))
    tx, _ = make_optimizer(cfg, PARAMS)
    state = tx.init(PARAMS)
    grads = {k: v for k, v in PARAMS.items()}
    updates, _ = tx.update(grads, state, PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    np.testing.assert_array_equal(new["encoder"]["cls_token"], PARAMS["encoder"]["cls_token"])
    assert not np.allclose(new["head"]["kernel"], PARAMS["head"]["kernel"])
