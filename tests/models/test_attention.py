"""layers.attention's explicit head-major form and its hand-written gradient match jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.models.layers import attention


def _qkv(n_q, n_k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)) * 2, dtype) for n in (n_q, n_k, n_k))
    return q, k, v


@pytest.mark.parametrize("n_q,n_k", [(7, 7), (11, 5)])  # self- and cross-attention
def test_values_and_gradients_match_jax(n_q, n_k):
    q, k, v = _qkv(n_q, n_k, jnp.float32)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, impl) * ct)

    with jax.default_matmul_precision("float32"):
        v1, g1 = jax.jit(jax.value_and_grad(loss("explicit"), argnums=(0, 1, 2)))(q, k, v)
        v0, g0 = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(g1[1]))) > 1e-2  # the key gradient is not trivially zero


def test_bfloat16_follows_float32():
    q, k, v = _qkv(9, 6, jnp.bfloat16)
    f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)).astype(jnp.float32)),
                                   argnums=(0, 1, 2)))
    val, grads = f(q, k, v)
    val32, grads32 = f(*(a.astype(jnp.float32) for a in (q, k, v)))
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(val, val32, rtol=0.05, atol=0.2)
    for a, b in zip(grads, grads32):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.1, atol=0.1)


def test_unknown_implementation_is_rejected():
    q, k, v = _qkv(3, 3, jnp.float32)
    with pytest.raises(ValueError, match="attention implementation"):
        attention(q, k, v, "flash")
