"""The fused GroupNorm kernel (csrc/group_norm.cc) computes what
`reference.group_norm` computes (GroupNorm with the conditioning shift, FiLM and swish):
values and every argument's gradient to f32 round-off, at the specialised channel
counts and others; accurately where the one-pass variance loses digits; under vmap;
bit-identical between calls; and the model's norms run on it with backend='cpu'.

Skipped where the kernels cannot be built, except when VDMREP_REQUIRE_CPU_KERNELS=1 (CI).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from vdmrep import config_lib
from vdmrep.backends.cpu import kernels
from vdmrep.backends import build_model
from vdmrep.backends.cpu import layers as cpu_layers, reference

_REASON = kernels.unavailable_reason()
if _REASON is not None and os.environ.get("VDMREP_REQUIRE_CPU_KERNELS") == "1":
  raise RuntimeError(f"VDMREP_REQUIRE_CPU_KERNELS=1 but the oneDNN kernels cannot run: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"oneDNN kernels: {_REASON}")


def _inputs(shape, seed=0):
  b, c = shape[0], shape[-1]
  ks = jax.random.split(jax.random.key(seed), 7)
  return dict(x=2.0 * jax.random.normal(ks[0], shape) + 0.5,
              scale=1.0 + 0.2 * jax.random.normal(ks[1], (c,)),
              bias=0.2 * jax.random.normal(ks[2], (c,)),
              shift=jax.random.normal(ks[3], (b, c)),
              fs=0.3 * jax.random.normal(ks[4], (b, c)),
              fb=0.3 * jax.random.normal(ks[5], (b, c)),
              probe=jax.random.normal(ks[6], shape))


def _loss(fn, groups, use_shift, use_film, swish, probe):
  def f(x, scale, bias, shift, fs, fb):
    y = fn(x, scale, bias, groups, 1e-6, shift=shift if use_shift else None,
           film=(fs, fb) if use_film else None, swish=swish)
    return jnp.sum(y * probe), y
  return f


@pytest.mark.parametrize("shape,groups", [
    ((3, 5, 6, 16), 4),    # a specialised channel count, 4 channels per group
    ((2, 4, 4, 64), 16),   # 64 channels (up-block inputs)
    ((1, 3, 7, 12), 1),    # the general path, batch of one, one group of every channel
    ((2, 4, 5, 8), 8),     # one channel per group
])
@pytest.mark.parametrize("use_shift,use_film,swish", [
    (False, False, True), (True, True, True), (True, False, False)])
def test_matches_layers_group_norm(shape, groups, use_shift, use_film, swish):
  a = _inputs(shape)
  args = [a[k] for k in ("x", "scale", "bias", "shift", "fs", "fb")]
  mk = lambda fn: jax.jit(jax.value_and_grad(
      _loss(fn, groups, use_shift, use_film, swish, a["probe"]), argnums=range(6),
      has_aux=True))
  (_, y), grads = mk(kernels.group_norm)(*args)
  (_, y_ref), grads_ref = mk(reference.group_norm)(*args)
  assert y.shape == shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(y_ref))))
  names = ("x", "scale", "bias", "shift", "film scale", "film bias")
  for name, g, r in zip(names, grads, grads_ref):
    # Floor 0.1: d shift is a sum of cancelling terms (exactly 0 with one channel per group).
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * max(float(jnp.max(jnp.abs(r))), 0.1),
                               err_msg=f"d {name}")
  if use_shift and groups < shape[-1]:  # a gradient that is there, not zeros compared
    assert float(jnp.max(jnp.abs(grads[3]))) > 0.1


@pytest.mark.parametrize("split,groups", [((16, 16), 8), ((6, 6), 3), ((5, 3), 2)])
def test_two_parts_match_their_concatenation(split, groups):
  """x given as (x1, x2) is normalised as concatenate([x1, x2], -1) (groups may straddle
  the boundary), and each part gets its slice of the gradient."""
  shape = (2, 4, 5, sum(split))
  a = _inputs(shape, seed=3)
  x1, x2 = a["x"][..., :split[0]], 3.0 * a["x"][..., split[0]:] - 1.0
  args = (x1, x2, a["scale"], a["bias"], a["shift"], a["fs"], a["fb"])
  def loss(joined):
    def f(x1, x2, scale, bias, shift, fs, fb):
      x = jnp.concatenate([x1, x2], -1) if joined else (x1, x2)
      fn = reference.group_norm if joined else kernels.group_norm
      return jnp.sum(fn(x, scale, bias, groups, shift=shift, film=(fs, fb), swish=True)
                     * a["probe"])
    return jax.jit(jax.value_and_grad(f, argnums=range(7)))
  (v, grads), (v_ref, grads_ref) = loss(False)(*args), loss(True)(*args)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for i, (g, r) in enumerate(zip(grads, grads_ref)):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * max(float(jnp.max(jnp.abs(r))), 0.1),
                               err_msg=f"argument {i}")


@pytest.mark.slow
def test_resnet_block_on_parts_equals_block_on_concatenation():
  """The U-Net's up block given (h, skip): same parameters (tree, values at init) and
  the same output and gradients as given their concatenation, with no concatenation
  in its program (the norm kernel and the 1x1 shortcut read the parts)."""
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  h, skip = jax.random.normal(k1, (2, 6, 6, 16)), jax.random.normal(k2, (2, 6, 6, 16))
  cond = jax.random.normal(k3, (2, 8))
  block = cpu_layers.ResnetBlock(out_ch=16)
  params = block.init(jax.random.key(0), (h, skip), cond)
  params_joined = block.init(jax.random.key(0), jnp.concatenate([h, skip], -1), cond)
  assert jax.tree.structure(params) == jax.tree.structure(params_joined)
  for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(params_joined)):
    np.testing.assert_array_equal(u, v)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape),
                        params)  # non-zero cond_proj and conv2, unlike at init
  probe = jax.random.normal(jax.random.key(6), h.shape)
  f = lambda p, h, s: jnp.sum(block.apply(p, (h, s), cond) * probe)
  f_joined = lambda p, h, s: jnp.sum(block.apply(p, jnp.concatenate([h, s], -1), cond) * probe)
  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  (v, g), (v_ref, g_ref) = step(params, h, skip), jax.value_and_grad(
      f_joined, argnums=(0, 1, 2))(params, h, skip)
  # v sums terms of both signs: bound its round-off (Winograd F(4x4)'s ~5e-6 of each
  # convolution's output) by the sum of their magnitudes.
  magnitude = float(jnp.sum(jnp.abs(block.apply(params, (h, skip), cond) * probe)))
  np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-5 * magnitude)
  scale = max(float(jnp.max(jnp.abs(t))) for t in jax.tree.leaves(g_ref))
  for u, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(u, r, rtol=0, atol=2e-5 * scale)
  hlo = step.lower(params, h, skip).as_text()
  assert "vdmrep_group_norm_parts_backward" in hlo
  # (The Winograd filter transforms concatenate [6, 3, C, O] filter rows; no activation.)
  assert not [l for l in hlo.splitlines() if "concatenate" in l and "tensor<2x6x6x" in l]


def test_parts_dense_is_dense_on_the_concatenation():
  parts = (jax.random.normal(jax.random.key(0), (3, 5)),
           jax.random.normal(jax.random.key(1), (3, 7)))
  joined = jnp.concatenate(parts, -1)
  p = cpu_layers.Dense(4).init(jax.random.key(2), parts)
  p_dense = nn.Dense(4).init(jax.random.key(2), joined)
  for u, v in zip(jax.tree.leaves(p), jax.tree.leaves(p_dense)):
    np.testing.assert_array_equal(u, v)
  np.testing.assert_allclose(cpu_layers.Dense(4).apply(p, parts),
                             nn.Dense(4).apply(p_dense, joined), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_parts", [1, 2])
def test_parts_dense_on_onednn_is_dense(n_parts):
  """backend='cpu' (each part a oneDNN 1x1 convolution, the up blocks' shortcuts
  and the attention projections): nn.Dense's values and gradients on the concatenation."""
  parts = tuple(jax.random.normal(jax.random.key(i), (2, 5, 6, 16)) for i in range(n_parts))
  joined = jnp.concatenate(parts, -1)
  module = cpu_layers.Dense(8)
  p = module.init(jax.random.key(2), parts)
  p = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(jax.random.key(3), t.shape), p)
  probe = jax.random.normal(jax.random.key(4), (2, 5, 6, 8))
  f = jax.jit(jax.value_and_grad(lambda p, xs: jnp.sum(module.apply(p, xs) * probe), (0, 1)))
  ref = jax.value_and_grad(lambda p, x: jnp.sum(nn.Dense(8).apply(p, x) * probe), (0, 1))
  (v, (gp, gx)), (v_ref, (gp_ref, gx_ref)) = f(p, parts), ref(p, joined)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for u, r in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref)):
    np.testing.assert_allclose(u, r, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(jnp.concatenate(gx, -1), gx_ref, rtol=1e-5, atol=1e-5)
  assert "vdmrep_conv_filter_grad" in f.lower(p, parts).as_text()


def test_statistics_are_accurate_where_one_pass_variance_is_not():
  """x = 100 + 0.01 noise: E[x^2] - E[x]^2 in float32 loses every digit of the variance
  (1e-4 against 1e4); the kernel's two-pass double statistics match a float64 GroupNorm."""
  x = 100.0 + 0.01 * jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
  scale, bias = jnp.ones(8), jnp.zeros(8)
  y = kernels.group_norm(x, scale, bias, 2, 1e-6)
  xd = np.asarray(x, np.float64).reshape(2, 36, 2, 4)
  ref = (xd - xd.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
      xd.var(axis=(1, 3), keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, ref.reshape(x.shape), rtol=0, atol=2e-3)
  assert float(jnp.max(jnp.abs(reference.group_norm(x, scale, bias, 2) - ref.reshape(x.shape)))) > 0.1


def test_vmap_and_determinism():
  a = _inputs((3, 4, 4, 16))
  f = jax.jit(lambda x, sh: kernels.group_norm(x, a["scale"], a["bias"], 4, shift=sh,
                                              swish=True))
  xs = jnp.stack([a["x"], 2.0 * a["x"]])
  shifts = jnp.stack([a["shift"], -a["shift"]])
  mapped = jax.vmap(f)(xs, shifts)
  for i in range(2):
    np.testing.assert_array_equal(mapped[i], f(xs[i], shifts[i]))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x, a["shift"]) * a["probe"])))
  first = np.asarray(grad(a["x"]))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(grad(a["x"])), first)


def test_rejects_bad_inputs():
  x = jnp.ones((2, 4, 4, 8))
  with pytest.raises(ValueError, match="do not split into 3 groups"):
    kernels.group_norm(x, jnp.ones(8), jnp.zeros(8), 3)
  with pytest.raises(ValueError, match="float32 only"):
    kernels.group_norm(x.astype(jnp.bfloat16), jnp.ones(8), jnp.zeros(8), 2)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    kernels.group_norm(jnp.ones((4, 8)), jnp.ones(8), jnp.zeros(8), 2)
  with pytest.raises(ValueError, match="differ only in C"):
    kernels.group_norm((x, jnp.ones((2, 4, 5, 8))), jnp.ones(16), jnp.zeros(16), 2)


def _hlo(conv_impl):
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder, c.model.backend = "mvdm", "te", conv_impl
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  x = jnp.zeros((2, 8, 8, 1), jnp.uint8)
  loss = lambda p: jnp.mean(model.elbo_terms(p, x, jax.random.key(1)).diffusion)
  return jax.jit(jax.grad(loss)).lower(params).as_text()


@pytest.mark.slow
def test_model_norms_use_the_kernel():
  """With backend='cpu' every GroupNorm of both networks is a kernel call, forward
  and backward (ResNet blocks' two, the attention blocks' and the output norms; the
  score net's 5 up blocks read [h, skip] as parts); with 'xla' none is."""
  hlo, hlo_xla = _hlo("cpu"), _hlo("xla")
  fwd, bwd = hlo.count("vdmrep_group_norm_forward"), hlo.count("vdmrep_group_norm_backward")
  assert fwd >= 20 and bwd == fwd
  assert hlo.count("vdmrep_group_norm_parts_forward") == 5  # MVDM: n_blocks + 1 up blocks
  assert hlo.count("vdmrep_group_norm_parts_backward") == 5
  assert "vdmrep_group_norm" not in hlo_xla
