"""`conv_impl` ('auto' | 'tuned' | 'xla'): the CPU-tuned conv lowerings can be switched off per model, reach every
conv of the stems and the ConvUNetR decoder, and 'auto' picks them on CPU only."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.models import build_convunetr, build_mae
from cinema_jax.models import layers as layers_mod
from cinema_jax.models.layers import resolve_conv_impl

SIZES = {"sax": [32, 32, 4], "lax_4c": [32, 32]}
TINY = {"size": "tiny", "conv_chans": [4, 8], "image_size": SIZES}


def _convs(jaxpr):
    """(kernel shape, feature_group_count) of every conv_general_dilated in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append((tuple(eqn.invars[1].aval.shape), eqn.params["feature_group_count"]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _convs(sub)
    return found


def _params(model, *args, **kw):
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0),
                                                              "mask": jax.random.key(1)}, *args, **kw)["params"]))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _images(views, batch=2):
    rng = np.random.default_rng(1)
    return {v: jnp.asarray(rng.random((batch, *SIZES[v], 1)), jnp.float32) for v in views}


def test_auto_is_tuned_on_cpu_and_xla_elsewhere(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto") == resolve_conv_impl(None) == "tuned"
    assert resolve_conv_impl("xla") == "xla" and resolve_conv_impl("tuned") == "tuned"
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(layers_mod.jax, "default_backend", lambda b=backend: b)
        assert resolve_conv_impl("auto") == "xla"
        assert resolve_conv_impl("tuned") == "tuned"
    with pytest.raises(ValueError, match="conv implementation"):
        resolve_conv_impl("cudnn")
    with pytest.raises(ValueError, match="conv implementation"):
        build_mae(dict(TINY, views=["sax"]), conv_impl="fast")


def test_mae_stem_lowering_follows_conv_impl():
    """The SAX (5x5x5) and LAX (5x5) depth-wise convs are XLA grouped convs under 'xla' only ('auto' on CPU is
    'tuned'); the MAE loss is the same either way."""
    views = ["sax", "lax_4c"]
    images = _images(views)
    models = {impl: build_mae(dict(TINY, views=views), conv_impl=impl) for impl in ("auto", "tuned", "xla")}
    params = _params(models["xla"], images)
    key = jax.random.key(3)

    def loss(m, p):
        return m.apply({"params": p}, images, rngs={"mask": key})["loss"]

    for impl, model in models.items():
        grouped = [k[:-2] for k, g in _convs(jax.make_jaxpr(lambda p, m=model: loss(m, p))(params).jaxpr) if g > 1]
        # 2 stages x 2 masked conv blocks per view
        assert sorted(grouped) == ([(5, 5)] * 4 + [(5, 5, 5)] * 4 if impl == "xla" else []), impl
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(jax.jit(lambda p: loss(models["tuned"], p))(params),
                                   jax.jit(lambda p: loss(models["xla"], p))(params), rtol=1e-4)


def test_convunetr_decoder_lowering_follows_conv_impl():
    """ConvUNetR's 3x3x3 convs are XLA 3-D convs (forward and backward) under 'xla' only, 2-D convs over depth
    planes (the three depth taps stacked in the channels) under 'tuned'; the outputs agree."""
    images = _images(["sax"], batch=1)
    cfg = dict(TINY, views=["sax"], out_chans=3, dec_chans=[4, 8, 8, 16, 16])
    models = {impl: build_convunetr(cfg, conv_impl=impl) for impl in ("tuned", "xla")}
    params = _params(models["xla"], images)

    def out(m, p):
        return m.apply({"params": p}, images)["sax"]

    for impl, model in models.items():
        grad = jax.grad(lambda p, m=model: jnp.sum(out(m, p)))
        kernels = [k for k, _ in _convs(jax.make_jaxpr(grad)(params).jaxpr)]
        assert any(len(k) == 5 and k[:3] == (3, 3, 3) for k in kernels) == (impl == "xla"), impl
        assert ((3, 3, 12, 4) in kernels) == (impl == "tuned")  # 4 -> 4 channels: three depth taps stacked
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(jax.jit(lambda p: out(models["tuned"], p))(params),
                                   jax.jit(lambda p: out(models["xla"], p))(params), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec, task", [("mae_pretrain.py:smoke", "pretrain_mae"),
                                        ("finetune_seg.py:smoke", "segment")])
def test_task_configs_pass_conv_to_the_model(spec, task):
    from cinema_jax.config import apply_overrides, load_base
    from cinema_jax.tasks import get_task

    path = str(Path(__file__).resolve().parents[2] / "configs" / spec)
    assert get_task(task).make_model(apply_overrides(load_base(path), ["conv=xla"])).conv_impl == "xla"
    assert get_task(task).make_model(load_base(path)).conv_impl == "auto"


def _dots(jaxpr):
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs (custom VJPs) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _dots(sub)
    return found


@pytest.mark.parametrize("n, h, w, c, o, padding", [(3, 9, 10, 4, 6, ((1, 1), (1, 1))), (2, 7, 7, 5, 5, "VALID"),
                                                    (2, 8, 5, 3, 7, "SAME"), (1, 6, 6, 8, 2, "SAME")])
def test_conv2d_tuned_kernel_gradient_matches_xla(n, h, w, c, o, padding, monkeypatch):
    """The denoiser's 2-D convs: 'tuned' takes the kernel gradient as one matmul per tap over row-shifted flat views
    (when C <= O); values and both gradients equal XLA's conv, and C > O keeps XLA's own kernel gradient. The
    channel floor is lifted so these small shapes take the flat path."""
    monkeypatch.setattr(layers_mod, "FLAT_TAPS_MIN_CHANNELS", 1)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (n, h, w, c))
    k = jax.random.normal(keys[1], (3, 3, c, o))

    def loss(impl):
        def f(x, k):
            y = layers_mod.conv2d(x, k, padding, impl)
            return jnp.sum(y * jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))
        return f

    grads = {impl: jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1)))(x, k) for impl in ("tuned", "xla")}
    for a, b in zip(jax.tree_util.tree_leaves(grads["tuned"]), jax.tree_util.tree_leaves(grads["xla"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
    taps = {impl: [s for s in _dots(jax.make_jaxpr(jax.grad(loss(impl), argnums=1))(x, k).jaxpr) if s == (c, o)]
            for impl in ("tuned", "xla")}
    assert len(taps["tuned"]) == (9 if c <= o else 0) and not taps["xla"]


def test_conv2d_flat_taps_need_enough_channels():
    """Below FLAT_TAPS_MIN_CHANNELS input channels 'tuned' keeps XLA's kernel gradient (thin matmuls lose there)."""
    floor = layers_mod.FLAT_TAPS_MIN_CHANNELS
    for c, flat in ((floor - 1, False), (floor, True)):
        x, k = jnp.ones((1, 6, 6, c)), jnp.ones((3, 3, c, c))
        jaxpr = jax.make_jaxpr(jax.grad(lambda k, x=x: jnp.sum(layers_mod.conv2d(x, k, "SAME", "tuned")), 0))(k)
        assert len([s for s in _dots(jaxpr.jaxpr) if s == (c, c)]) == (9 if flat else 0)


def test_denoise_config_passes_conv_to_every_frame_conv(monkeypatch):
    from cinema_jax.config import apply_overrides, load_base

    monkeypatch.setattr(layers_mod, "FLAT_TAPS_MIN_CHANNELS", 1)  # the smoke model's widths are under the floor
    from cinema_jax.tasks import get_task

    path = str(Path(__file__).resolve().parents[2] / "configs" / "denoise.py:smoke")
    model = get_task("denoise").make_model(apply_overrides(load_base(path), ["conv=xla"]))
    assert model.conv == "xla" and get_task("denoise").make_model(load_base(path)).conv == "auto"
    x = jnp.zeros((1, 32, 32, 4, 3))
    params = _params(model, x)
    counts = {}
    for impl in ("tuned", "xla"):
        m = model.clone(conv=impl)
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, x) ** 2)))(params).jaxpr
        counts[impl] = len([s for s in _dots(jaxpr) if len(s) == 2 and s[0] <= s[1]])
    assert counts["tuned"] > counts["xla"] + 9 * 5  # many 3x3 convs' kernel gradients became per-tap matmuls
