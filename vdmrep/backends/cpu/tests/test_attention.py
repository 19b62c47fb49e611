"""The fused attention kernel (csrc/attention.cc) computes what
`reference.attention` computes: values and gradients to f32 round-off, over row-tile
remainders, extreme logits, jit and vmap, bit-identical between calls; and the model
routes its attention blocks to it with backend='cpu'.

Skipped where the kernels cannot be built, except when VDMREP_REQUIRE_CPU_KERNELS=1 (CI).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import config_lib
from vdmrep.backends.cpu import kernels
from vdmrep.backends import build_model
from vdmrep.backends.cpu import layers as cpu_layers, reference

_REASON = kernels.unavailable_reason()
if _REASON is not None and os.environ.get("VDMREP_REQUIRE_CPU_KERNELS") == "1":
  raise RuntimeError(f"VDMREP_REQUIRE_CPU_KERNELS=1 but the oneDNN kernels cannot run: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"oneDNN kernels: {_REASON}")


def _qkv(shape, scale=1.0, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(scale * jax.random.normal(k, shape) for k in keys)


def _check(q, k, v, rtol=2e-5):
  ref, vjp_ref = jax.vjp(lambda *a: reference.attention(*a), q, k, v)
  out, vjp = jax.jit(lambda *a: jax.vjp(kernels.attention, *a))(q, k, v)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(ref))))
  d_out = jax.random.normal(jax.random.key(9), ref.shape)
  for name, a, b in zip("qkv", vjp(d_out), vjp_ref(d_out)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))),
                               err_msg=f"d{name}")


@pytest.mark.parametrize("shape", [
    (2, 64, 16),    # one full 64-row tile (8x8 images)
    (3, 100, 32),   # a full tile and a 36-row remainder
    (1, 200, 8),    # three tiles and a remainder, odd batch
    (4, 5, 4),      # fewer rows than a tile
])
def test_matches_xla_values_and_gradients(shape):
  _check(*_qkv(shape))


def test_extreme_logits():
  """Logits in the hundreds: most weights underflow (the polynomial exp clamps at -87.3)
  and each softmax row is nearly one-hot; outputs and gradients still agree."""
  q, k, v = _qkv((2, 130, 16), scale=6.0, seed=1)
  logits = jnp.einsum("bqc,bkc->bqk", q, k) / 4.0
  assert float(jnp.max(logits) - jnp.min(logits)) > 300
  _check(q, k, v, rtol=1e-4)


def test_vmap_and_determinism():
  q, k, v = _qkv((3, 2, 70, 8), seed=2)
  mapped = jax.jit(jax.vmap(kernels.attention))(q, k, v)
  for i in range(3):
    np.testing.assert_array_equal(mapped[i], jax.jit(kernels.attention)(q[i], k[i], v[i]))
  g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(kernels.attention(*a))), (0, 1, 2)))
  first = g(q[0], k[0], v[0])
  for _ in range(3):
    for a, b in zip(g(q[0], k[0], v[0]), first):
      np.testing.assert_array_equal(a, b)


def test_rejects_bad_inputs():
  q, k, v = _qkv((2, 10, 4))
  with pytest.raises(ValueError, match="equal"):
    kernels.attention(q, k[:, :5], v)
  with pytest.raises(ValueError, match="float32 only"):
    kernels.attention(q.astype(jnp.bfloat16), k, v)


@pytest.mark.slow
def test_model_attention_blocks_use_the_kernel():
  """backend='cpu': both attention blocks (encoder, score net) call the kernel,
  forward and backward; 'xla': neither does."""
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder = "mvdm", "te"
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)), jnp.uint8)
  for impl in ("cpu", "xla"):
    c.model.backend = impl
    model = build_model(c.model)
    params = model.init(jax.random.key(0), (8, 8, 1))
    loss = lambda p: jnp.mean(model.elbo_terms(p, x, jax.random.key(1)).diffusion)
    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    expected = 2 if impl == "cpu" else 0
    assert hlo.count("vdmrep_attention_forward") == expected, impl
    assert hlo.count("vdmrep_attention_backward") == expected, impl
