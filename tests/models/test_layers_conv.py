"""layers.Conv's cheaper lowerings (matmul, patch matmul, depth-wise taps with a custom gradient) give the
same values and gradients as XLA's plain convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.models.conv_cpu import CONV_DIMS as _CONV_DIMS
from cinema_jax.models.layers import Conv


def _reference(x, w, b, strides, padding, groups):
    y = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_CONV_DIMS[x.ndim - 2],
                                     feature_group_count=groups, precision="highest")
    return y + b


CASES = [  # (input shape, kernel, strides, padding, groups, out)
    ((2, 12, 10, 6, 8), (5, 5, 5), (1, 1, 1), "SAME", 8, 8),  # 3-D depth-wise (SAX stem)
    ((2, 9, 10, 6, 4), (4, 3, 2), (1, 1, 1), "SAME", 4, 4),  # 3-D depth-wise, even and mixed kernel (asymmetric pad)
    ((2, 12, 10, 8), (5, 5), (1, 1), "SAME", 8, 8),  # 2-D depth-wise (LAX stem)
    ((2, 9, 10, 4), (2, 3), (1, 1), "SAME", 4, 4),  # 2-D depth-wise, even kernel
    ((2, 8, 8, 4, 6), (1, 1, 1), (1, 1, 1), "SAME", 1, 5),  # 1x1 -> matmul
    ((2, 8, 8, 4, 3), (2, 2, 1), (2, 2, 1), "VALID", 1, 5),  # kernel == stride -> patch matmul
    ((2, 8, 8, 4, 3), (3, 3, 3), (1, 1, 1), "SAME", 1, 4),  # 3-D -> per-depth-tap 2-D convs over B*Z (ConvUNetR)
    ((2, 8, 8, 4, 3), (3, 3, 1), (1, 1, 1), "SAME", 1, 4),  # depth-1 kernel -> one 2-D conv over B*Z
    ((2, 8, 8, 5, 3), (3, 3, 2), (1, 1, 1), "SAME", 1, 4),  # even depth kernel: lax's asymmetric SAME split
    ((2, 8, 8, 5, 3), (3, 3, 4), (1, 1, 1), "SAME", 1, 4),
    ((2, 9, 8, 5, 3), (3, 3, 3), (2, 2, 1), "SAME", 1, 4),  # in-plane stride
    ((2, 8, 8, 5, 3), (3, 3, 3), (1, 1, 1), "VALID", 1, 4),
    ((2, 8, 8, 5, 3), (3, 3, 3), (1, 1, 1), ((1, 0), (0, 2), (2, 1)), 1, 4),  # explicit padding
    ((2, 8, 8, 5, 4), (3, 3, 3), (1, 1, 1), "SAME", 2, 6),  # grouped, not depth-wise
    ((2, 8, 8, 6, 3), (3, 3, 3), (1, 1, 2), "SAME", 1, 4),  # depth stride: XLA's 3-D conv
]


@pytest.mark.parametrize("shape,kernel,strides,padding,groups,out", CASES)
def test_values_and_gradients_match_lax(shape, kernel, strides, padding, groups, out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    conv = Conv(out, kernel, strides, padding, groups, kernel_init=jax.nn.initializers.normal(0.3),
                bias_init=jax.nn.initializers.normal(0.3))
    params = conv.init(jax.random.key(0), x)["params"]
    ct = jnp.asarray(rng.standard_normal(conv.apply({"params": params}, x).shape), jnp.float32)

    def ours(p, x):
        return jnp.sum(conv.apply({"params": p}, x) * ct)

    def ref(p, x):
        return jnp.sum(_reference(x, p["kernel"], p["bias"], strides, padding, groups) * ct)

    with jax.default_matmul_precision("float32"):
        v1, (gp1, gx1) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(params, x)
        v0, (gp0, gx0) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(v1, v0, rtol=1e-4)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gp1["kernel"], gp0["kernel"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gp1["bias"], gp0["bias"], rtol=1e-4, atol=1e-4)
