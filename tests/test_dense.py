"""weight_einsum: the plain einsum's values and gradients, checked against float64 matrix formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.models.dense import weight_einsum

SPECS = {  # spec: (x shape, w shape) — the MLP's and the LM head's (untied and tied) einsums
    "bth,hi->bti": ((2, 5, 8), (8, 12)),
    "bch,hv->bcv": ((3, 4, 8), (8, 16)),
    "bch,vh->bcv": ((3, 4, 8), (16, 8)),
}


def _operands(spec: str, dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    x_shape, w_shape = SPECS[spec]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape, dtype)
    w = jax.random.normal(keys[1], w_shape, dtype)
    out = jnp.einsum(spec, x, w)
    return x, w, jax.random.normal(keys[2], out.shape, jnp.float32)  # the cotangent of the output


def _grads(spec: str, x: jax.Array, w: jax.Array, cotangent: jax.Array, separate: bool):
    def loss(x, w):
        y = weight_einsum(spec, x, w, preferred_element_type=jnp.float32, separate=separate)
        return jnp.sum(y * cotangent), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return y, grads


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_values_and_gradients_match_matrix_formulas(spec: str) -> None:
    x, w, g = _operands(spec)
    y, (dx, dw) = _grads(spec, x, w, g, separate=True)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    w_hf = w64 if spec.split(",")[1].startswith("h") else w64.T  # [H, F]
    rows_x, rows_g = x64.reshape(-1, x64.shape[-1]), g64.reshape(-1, g64.shape[-1])
    np.testing.assert_allclose(y, (rows_x @ w_hf).reshape(y.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, (rows_g @ w_hf.T).reshape(x.shape), rtol=1e-5, atol=1e-5)
    dw_hf = rows_x.T @ rows_g  # the weight gradient sums over every token
    np.testing.assert_allclose(dw, dw_hf if w_hf is w64 else dw_hf.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_separate_path_equals_plain_einsum(dtype) -> None:
    spec = "bch,hv->bcv"
    x, w, g = _operands(spec, dtype)
    y_plain, grads_plain = _grads(spec, x, w, g, separate=False)
    y_sep, grads_sep = _grads(spec, x, w, g, separate=True)
    np.testing.assert_array_equal(y_sep, y_plain)
    for sep, plain in zip(grads_sep, grads_plain):
        assert sep.dtype == plain.dtype == dtype
        tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bfloat16 rounds the float32 gradient once, maybe differently
        np.testing.assert_allclose(np.asarray(sep, np.float32), np.asarray(plain, np.float32), rtol=tol, atol=tol)


def test_cpu_default_takes_the_separate_weight_gradient() -> None:
    x, w, g = _operands("bth,hi->bti")
    grad = jax.grad(lambda x, w: jnp.sum(weight_einsum("bth,hi->bti", x, w) * g), argnums=1)
    assert "optimization_barrier" in str(jax.make_jaxpr(grad)(x, w))
    plain = jax.grad(lambda x, w: jnp.sum(weight_einsum("bth,hi->bti", x, w, separate=False) * g), argnums=1)
    assert "optimization_barrier" not in str(jax.make_jaxpr(plain)(x, w))


def test_rejects_specs_it_cannot_differentiate() -> None:
    x, w, _ = _operands("bth,hi->bti")
    with pytest.raises(ValueError, match="named axes"):
        weight_einsum("...h,hi->...i", x, w)
