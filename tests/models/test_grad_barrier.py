"""layers.grad_barrier: an identity in value and gradient that puts each transformer block's input cotangent behind
an optimization barrier (backward only), so XLA cannot re-derive the residual stream's cotangent sum across blocks."""

import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.models import layers
from cinema_jax.models.layers import Block, grad_barrier


def test_identity_in_value_and_gradient():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
    f = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(x) * x))
    v0, g0 = f(x)
    v1, g1 = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(grad_barrier(x)) * grad_barrier(x))))(x)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-6)


def _stack_grad_hlo(n_blocks, cross):
    """Lowered forward and gradient of `n_blocks` Blocks (cross-attending to a fixed kv input when `cross`)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32) if cross else None
    blocks = [Block(n_heads=2, name=f"b{i}") for i in range(n_blocks)]
    params = [b.init(jax.random.PRNGKey(i), x, kv) for i, b in enumerate(blocks)]

    def fwd(params, x, kv):
        for b, p in zip(blocks, params):
            x = b.apply(p, x, kv)
        return jnp.sum(x ** 2)

    grad = jax.grad(fwd, argnums=(0, 1, 2) if cross else (0, 1))
    return (jax.jit(fwd).lower(params, x, kv).as_text(), jax.jit(grad).lower(params, x, kv).as_text(),
            jax.jit(grad)(params, x, kv))


def test_one_barrier_per_block_input_in_backward_only():
    for n, cross in ((3, False), (4, True)):
        fwd_hlo, grad_hlo, _ = _stack_grad_hlo(n, cross)
        assert fwd_hlo.count("optimization_barrier") == 0
        # one per block on the residual stream, one more per block on its kv input when cross-attending
        assert grad_hlo.count("stablehlo.optimization_barrier") == n * (2 if cross else 1)


def test_block_gradients_unchanged_by_the_barrier(monkeypatch):
    _, _, with_barrier = _stack_grad_hlo(3, True)
    monkeypatch.setattr(layers, "grad_barrier", lambda x: x)
    _, hlo, without = _stack_grad_hlo(3, True)
    assert "optimization_barrier" not in hlo  # the monkeypatch reached Block
    for a, b in zip(jax.tree.leaves(with_barrier), jax.tree.leaves(without)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_one_barrier_per_imaging_transformer_cell():
    from cinema_jax.models.imaging_transformer import Block as ITBlock
    from cinema_jax.models.imaging_transformer import Geometry

    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 8, 8, 4)), jnp.float32)  # (B, T, X, Y, C)
    blk = ITBlock("T1L1G1", width=8, heads=2, geometry=Geometry((2, 2), (2, 2), (2, 2), (2, 2)),
                  conv="xla")  # the tuned convs sequence their kernel-gradient taps with barriers of their own
    params = blk.init(jax.random.PRNGKey(0), x)
    grad = jax.grad(lambda p, x: jnp.sum(blk.apply(p, x) ** 2), argnums=(0, 1))
    assert jax.jit(grad).lower(params, x).as_text().count("stablehlo.optimization_barrier") == 3  # T, L, G cells
