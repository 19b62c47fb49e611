"""The pure-JAX references of the CPU kernels (reference.py) and the backend's drop-in
blocks (layers.py) against flax's textbook ops: values, gradients, parameter trees.
The kernel-free parts run anywhere; the blocks need the kernels built."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep.backends.cpu import kernels
from vdmrep.backends.cpu.layers import Conv3x3, GroupNorm, ResnetBlock
from vdmrep.backends.cpu.reference import attention, group_norm

_REASON = kernels.unavailable_reason()
needs_kernels = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernels: {_REASON}")


def _attention_reference(q, k, v):
  w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(q.shape[-1]), axis=-1)
  return jnp.einsum("bqk,bkc->bqc", w, v)


def _assert_trees_close(a, b, rtol):
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("chunk", [1, 2, 4, 3])  # 3 does not divide B = 4: whole batch
def test_chunked_attention_matches_one_shot(chunk):
  q, k, v, dout = [jax.random.normal(jax.random.key(i), (4, 10, 6)) for i in range(4)]
  out, vjp = jax.vjp(lambda *a: attention(*a, batch_chunk=chunk), q, k, v)
  ref, vjp_ref = jax.vjp(_attention_reference, q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(vjp(dout), vjp_ref(dout)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_attention_stores_no_weight_matrix():
  """The chunked backward recomputes the [N, N] weights: nothing of size B*N*N is kept."""
  b, n = 4, 64
  q, k, v = [jax.random.normal(jax.random.key(i), (b, n, 8)) for i in range(3)]
  biggest = lambda chunk: max(leaf.size for leaf in jax.tree.leaves(
      jax.vjp(lambda *a: attention(*a, batch_chunk=chunk), q, k, v)[1]))
  assert biggest(0) >= b * n * n  # plain autodiff keeps the softmax weights
  assert biggest(1) <= b * n * 8  # the chunked form keeps only q, k, v, out, lse


@pytest.mark.slow
def test_chunked_attention_bfloat16_matches_one_shot():
  q, k, v, dout = [jax.random.normal(jax.random.key(i), (4, 32, 8), jnp.bfloat16)
                   for i in range(4)]
  out, vjp = jax.vjp(lambda *a: attention(*a, batch_chunk=2), q, k, v)
  ref, vjp_ref = jax.vjp(lambda *a: attention(*a, batch_chunk=0), q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = lambda t: np.asarray(t, np.float32)
  np.testing.assert_allclose(f32(out), f32(ref), rtol=2e-2, atol=2e-2)
  for a, b in zip(vjp(dout), vjp_ref(dout)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(a), f32(b), rtol=5e-2, atol=5e-2)


def _flax_group_norm(x, scale, bias, groups, shift=None, film=None, swish=False):
  """The textbook ops: (x + shift) -> nn.GroupNorm -> FiLM -> swish."""
  if shift is not None:
    x = x + shift[:, None, None, :]
  y = nn.GroupNorm(groups, epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
  if film is not None:
    y = y * (1.0 + film[0][:, None, None, :]) + film[1][:, None, None, :]
  return nn.swish(y) if swish else y


@pytest.mark.slow
@pytest.mark.parametrize("shift,film,swish", [(False, False, False), (False, False, True),
                                              (True, False, True), (False, True, True),
                                              (True, True, False)])
@needs_kernels
def test_group_norm_matches_flax_values_and_gradients(shift, film, swish):
  """The backend's GroupNorm (the kernel) and reference.group_norm vs nn.GroupNorm + add
  + FiLM + swish:
  values and gradients with respect to every input (x offset from 0 so the variance
  is not trivially E[x^2])."""
  ks = jax.random.split(jax.random.key(0), 7)
  b, c, groups = 3, 12, 3
  x = 2.0 * jax.random.normal(ks[0], (b, 5, 4, c)) + 0.7
  scale = 1.0 + 0.3 * jax.random.normal(ks[1], (c,))
  bias = 0.3 * jax.random.normal(ks[2], (c,))
  sh = jax.random.normal(ks[3], (b, c)) if shift else None
  fm = (0.5 * jax.random.normal(ks[4], (b, c)), jax.random.normal(ks[5], (b, c))) if film else None
  probe = jax.random.normal(ks[6], x.shape)

  def loss(fn, *args):
    return jnp.sum(fn(*args) * probe)

  kernel = lambda x, scale, bias, sh, fm: GroupNorm(groups).apply(
      {"params": {"scale": scale, "bias": bias}}, x, shift=sh, film=fm, swish=swish)
  folded = lambda x, scale, bias, sh, fm: group_norm(x, scale, bias, groups, shift=sh,
                                                     film=fm, swish=swish)
  ref = lambda x, scale, bias, sh, fm: _flax_group_norm(x, scale, bias, groups, sh, fm, swish)
  args = (x, scale, bias, sh, fm)
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3, 4))(*args)
  for ours in (kernel, folded):
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=0, atol=2e-6)
    g = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3, 4))(*args)
    _assert_trees_close(g, g_ref, rtol=2e-6)


@needs_kernels
def test_group_norm_keeps_flax_parameters_and_casts_like_it():
  """Same parameter tree as nn.GroupNorm (checkpoints load either way); bf16 compute
  gives a bf16 output within bf16 rounding of the f32 one."""
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
  p_ours = GroupNorm(2).init(jax.random.key(0), x)
  p_flax = nn.GroupNorm(2).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), p_flax)
  y16 = GroupNorm(2, dtype=jnp.bfloat16).apply(p_ours, x.astype(jnp.bfloat16),
                                                          swish=True)
  assert y16.dtype == jnp.bfloat16
  y32 = nn.swish(nn.GroupNorm(2).apply(p_flax, x))
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.05)
  with pytest.raises(ValueError, match="do not split into 3 groups"):
    group_norm(x, jnp.ones(8), jnp.zeros(8), 3)


def _reference_resnet_block(p, x, cond, film):
  """ResnetBlock written with flax's GroupNorm, conditioning add and FiLM as separate ops."""
  conv = lambda q, h: nn.Conv(q["kernel"].shape[-1], (3, 3)).apply({"params": q}, h)
  dense = lambda q, h: nn.Dense(q["kernel"].shape[-1], use_bias="bias" in q).apply(
      {"params": q}, h)
  gn = lambda q, h: nn.GroupNorm(max(1, min(h.shape[-1] // 4, 32)), epsilon=1e-6).apply(
      {"params": q}, h)
  h = conv(p["conv1"], nn.swish(gn(p["norm1"], x)))
  h = h + dense(p["cond_proj"], cond)[:, None, None, :]
  h = gn(p["norm2"], h)
  s, b = jnp.split(dense(p["film"], film)[:, None, None, :], 2, axis=-1)
  h = conv(p["conv2"], nn.swish(h * (1.0 + s) + b))
  return (dense(p["nin_shortcut"], x) if "nin_shortcut" in p else x) + h


@pytest.mark.slow
@pytest.mark.parametrize("c_in,out_ch", [(8, 12), (16, 32), (32, 32)])
@needs_kernels
def test_resnet_block_matches_the_textbook_form(c_in, out_ch):
  """A whole ResNet block vs the same block written with flax's ops, random parameters:
  values and parameter gradients. The backend's block folds the
  conditioning add and FiLM into its second GroupNorm, adds the convolutions' biases and
  the shortcut inside the convolution kernel (Winograd's, at 16-128 channels; oneDNN's
  direct one and XLA adds at 8 -> 12) and materialises its output."""
  ks = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(ks[0], (2, 6, 6, c_in)) + 0.5
  cond, film = jax.random.normal(ks[1], (2, 10)), jax.random.normal(ks[2], (2, 6))
  block = ResnetBlock(out_ch=out_ch)
  params = block.init(ks[3], x, cond, film)["params"]
  assert ("nin_shortcut" in params) == (c_in != out_ch)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(ks[4], p.shape), params)
  ours = lambda p: block.apply({"params": p}, x, cond, film)
  ref = lambda p: _reference_resnet_block(p, x, cond, film)
  # F(4x4) Winograd's round-off (test_winograd.py) where it runs.
  tol = 2e-5 if c_in >= 16 else 1e-5
  want = ref(params)
  np.testing.assert_allclose(ours(params), want, rtol=0, atol=tol * max(1.0, float(
      jnp.max(jnp.abs(want)))))
  g = jax.grad(lambda p: jnp.sum(jnp.sin(ours(p))))(params)
  g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref(p))))(params)
  _assert_trees_close(g, g_ref, rtol=tol)


@needs_kernels
def test_conv3x3_is_nn_conv_plus_residual():
  """layers.Conv3x3 has nn.Conv's parameters and initial values (checkpoints carry over)
  and computes nn.Conv's result plus the residual."""
  kx, kr, kp = jax.random.split(jax.random.key(3), 3)
  x, r = jax.random.normal(kx, (2, 7, 7, 16)), jax.random.normal(kr, (2, 7, 7, 32))
  ours = Conv3x3(32)
  p_ours, p_flax = ours.init(kp, x, r), nn.Conv(32, (3, 3)).init(kp, x)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_flax)
  p = jax.tree.map(lambda a: a + 0.1, p_flax)  # a non-zero bias
  want = nn.Conv(32, (3, 3)).apply(p, x)
  np.testing.assert_allclose(ours.apply(p, x, r), want + r, rtol=0, atol=2e-5)
  np.testing.assert_allclose(ours.apply(p, x), want, rtol=0, atol=2e-5)
