"""The speed-ups leave the mathematics unchanged: loss values and gradients agree with
the straightforward forms to float tolerance (and mixed precision stays close)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import collapse, config_lib, data, losses
from vdmrep.kernels import onednn
from vdmrep.models import build_model
import flax.linen as nn

from vdmrep.models.layers import Conv3x3, GroupNorm, ResnetBlock, attention, group_norm


def _recon_reference(x, z, g0, vocab=256):
  """Pick x from the full [..., vocab] log-softmax (the textbook form)."""
  logp = losses.reconstruction_logits(z, g0, vocab)
  return -jnp.sum(jnp.take_along_axis(logp, x[..., None].astype(jnp.int32), -1)[..., 0],
                  axis=(1, 2, 3))


@pytest.mark.parametrize("gamma_0", [-13.3, -11.0, 2 * math.log(2 / 256) - 1e-3, -5.0, 0.5,
                                     "per_example"])
def test_reconstruction_loss_matches_full_softmax(gamma_0):
  """Windowed normaliser (sharp decoder) and full one agree with the [.., 256] form,
  value and gradient, including z beyond the data range and x at the edges."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, 4, 4, 2))
  x[0, 0, 0] = 0
  x[0, 0, 1] = 255
  if gamma_0 == "per_example":
    g0 = jnp.asarray([-13.3, -9.0, -12.0])
  else:
    g0 = jnp.asarray(gamma_0, jnp.float32)
  s = float(jnp.max(jnp.exp(0.5 * g0)))
  noise = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  z = losses.data_to_model_scale(x) + max(s, 0.01) * noise
  z = z.at[1, 0, 0, 0].set(1.3).at[1, 0, 0, 1].set(-1.2)  # outside [-1, 1]
  f_new = lambda z, g: jnp.sum(losses.reconstruction_loss(x, z, g))
  f_ref = lambda z, g: jnp.sum(_recon_reference(x, z, g))
  np.testing.assert_allclose(losses.reconstruction_loss(x, z, g0), _recon_reference(x, z, g0),
                             rtol=2e-5, atol=1e-3)
  (gz, gg), (rz, rg) = jax.grad(f_new, (0, 1))(z, g0), jax.grad(f_ref, (0, 1))(z, g0)
  np.testing.assert_allclose(gz, rz, rtol=1e-4, atol=1e-3 * float(jnp.max(jnp.abs(rz))))
  np.testing.assert_allclose(gg, rg, rtol=1e-4, atol=1e-3)


def _attention_reference(q, k, v):
  w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(q.shape[-1]), axis=-1)
  return jnp.einsum("bqk,bkc->bqc", w, v)


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


def _tiny_config(**model):
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder = "mvdm", "te"
  c.model.n_blocks, c.model.channels = 1, 8
  for k, v in model.items():
    c.model[k] = v
  config_lib.validate(c)
  return c


def _loss_and_grads(config, params=None, x=None):
  model = build_model(config.model)
  if params is None:
    params = model.init(jax.random.key(0), (8, 8, 1))
    # Non-zero output layers so every block's gradient is non-trivial.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(7), p.shape),
                          params)
  if x is None:
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 1)), jnp.uint8)

  def loss(p):
    return collapse.objective(model.elbo_terms(p, x, jax.random.key(3)), 0, config)[0]
  return params, x, jax.jit(jax.value_and_grad(loss))(params)


def _assert_trees_close(a, b, rtol):
  """|a - b| <= rtol * max|b| over the whole tree: float32 sums taken in another order
  differ by about that (a leaf whose exact gradient is ~0 holds only such noise)."""
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def plain():
  """(params, x, (loss, grads)) of the straightforward model: attention all at once,
  XLA's convolution."""
  return _loss_and_grads(_tiny_config(attention_chunk=0, conv_impl="xla"))


@pytest.mark.parametrize("variant", [dict(attention_chunk=1, remat=True), dict(attention_chunk=2)])
def test_fast_variants_leave_loss_and_gradients_unchanged(plain, variant):
  """Chunked attention (encoder + score net) and remat vs the plain model, same params."""
  params, x, (loss_ref, g_ref) = plain
  _, _, (loss, g) = _loss_and_grads(_tiny_config(**variant), params, x)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  _assert_trees_close(g, g_ref, rtol=1e-5)


def test_bfloat16_compute_keeps_f32_params_and_close_loss(plain):
  """bf16 compute: parameters and gradients stay f32 (master weights), the loss is f32
  and within bf16 rounding of the f32 loss, and the convolutions really run in bf16."""
  params, x, (loss32, g32) = plain
  cfg16 = _tiny_config(compute_dtype="bfloat16")
  _, _, (loss16, g16) = _loss_and_grads(cfg16, params, x)
  assert loss16.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  assert abs(float(loss16) - float(loss32)) < 0.02 * abs(float(loss32))
  cos = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))) / (
      optax_norm(g16) * optax_norm(g32))
  assert cos > 0.99
  model = build_model(cfg16.model)
  hlo = jax.jit(lambda p: model.elbo_terms(p, x, jax.random.key(3))["diffusion"]).lower(
      params).as_text()
  assert "bf16" in hlo and "convolution" in hlo


def _flax_group_norm(x, scale, bias, groups, shift=None, film=None, swish=False):
  """The textbook ops: (x + shift) -> nn.GroupNorm -> FiLM -> swish."""
  if shift is not None:
    x = x + shift[:, None, None, :]
  y = nn.GroupNorm(groups, epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
  if film is not None:
    y = y * (1.0 + film[0][:, None, None, :]) + film[1][:, None, None, :]
  return nn.swish(y) if swish else y


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("shift,film,swish", [(False, False, False), (False, False, True),
                                              (True, False, True), (False, True, True),
                                              (True, True, False)])
def test_group_norm_matches_flax_values_and_gradients(fold, shift, film, swish):
  """GroupNorm (folded, and flax's op sequence) vs nn.GroupNorm + add + FiLM + swish:
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

  ours = lambda x, scale, bias, sh, fm: GroupNorm(groups, fold=fold).apply(
      {"params": {"scale": scale, "bias": bias}}, x, shift=sh, film=fm, swish=swish)
  ref = lambda x, scale, bias, sh, fm: _flax_group_norm(x, scale, bias, groups, sh, fm, swish)
  args = (x, scale, bias, sh, fm)
  np.testing.assert_allclose(ours(*args), ref(*args), rtol=0, atol=2e-6)
  g = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3, 4))(*args)
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3, 4))(*args)
  _assert_trees_close(g, g_ref, rtol=2e-6)


def test_group_norm_keeps_flax_parameters_and_casts_like_it():
  """Same parameter tree as nn.GroupNorm (checkpoints load either way); bf16 compute
  gives a bf16 output within bf16 rounding of the f32 one."""
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
  p_ours = GroupNorm(2).init(jax.random.key(0), x)
  p_flax = nn.GroupNorm(2).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), p_flax)
  y16 = GroupNorm(2, dtype=jnp.bfloat16, fold=True).apply(p_ours, x.astype(jnp.bfloat16),
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


@pytest.mark.parametrize("c_in,out_ch", [(8, 12), (16, 32), (32, 32)])
@pytest.mark.parametrize("conv_impl", ["xla", "onednn"])
def test_resnet_block_matches_the_textbook_form(conv_impl, c_in, out_ch):
  """A whole ResNet block vs the same block written with flax's ops, random parameters:
  values and parameter gradients. With oneDNN convolutions the block folds the
  conditioning add and FiLM into its second GroupNorm, adds the convolutions' biases and
  the shortcut inside the convolution kernel (Winograd's, at 16-128 channels; oneDNN's
  direct one and XLA adds at 8 -> 12) and materialises its output."""
  if conv_impl == "onednn" and (reason := onednn.unavailable_reason()):
    pytest.skip(reason)
  ks = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(ks[0], (2, 6, 6, c_in)) + 0.5
  cond, film = jax.random.normal(ks[1], (2, 10)), jax.random.normal(ks[2], (2, 6))
  block = ResnetBlock(out_ch=out_ch, conv_impl=conv_impl)
  params = block.init(ks[3], x, cond, film)["params"]
  assert ("nin_shortcut" in params) == (c_in != out_ch)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(ks[4], p.shape), params)
  ours = lambda p: block.apply({"params": p}, x, cond, film)
  ref = lambda p: _reference_resnet_block(p, x, cond, film)
  # F(4x4) Winograd's round-off (tests/test_onednn_winograd.py) where it runs.
  tol = 2e-5 if conv_impl == "onednn" and c_in >= 16 else 1e-5
  want = ref(params)
  np.testing.assert_allclose(ours(params), want, rtol=0, atol=tol * max(1.0, float(
      jnp.max(jnp.abs(want)))))
  g = jax.grad(lambda p: jnp.sum(jnp.sin(ours(p))))(params)
  g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref(p))))(params)
  _assert_trees_close(g, g_ref, rtol=tol)


@pytest.mark.parametrize("conv_impl", ["xla", "onednn"])
def test_conv3x3_is_nn_conv_plus_residual(conv_impl):
  """layers.Conv3x3 has nn.Conv's parameters and initial values (checkpoints carry over)
  and computes nn.Conv's result plus the residual."""
  if conv_impl == "onednn" and (reason := onednn.unavailable_reason()):
    pytest.skip(reason)
  kx, kr, kp = jax.random.split(jax.random.key(3), 3)
  x, r = jax.random.normal(kx, (2, 7, 7, 16)), jax.random.normal(kr, (2, 7, 7, 32))
  ours = Conv3x3(32, conv_impl=conv_impl)
  p_ours, p_flax = ours.init(kp, x, r), nn.Conv(32, (3, 3)).init(kp, x)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_flax)
  p = jax.tree.map(lambda a: a + 0.1, p_flax)  # a non-zero bias
  want = nn.Conv(32, (3, 3)).apply(p, x)
  np.testing.assert_allclose(ours.apply(p, x, r), want + r, rtol=0, atol=2e-5)
  np.testing.assert_allclose(ours.apply(p, x), want, rtol=0, atol=2e-5)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(tree)))


def test_prefetch_yields_exactly_the_unprefetched_batches():
  ds = data.Dataset("toy", np.arange(50 * 4, dtype=np.uint8).reshape(50, 2, 2, 1),
                    np.zeros((5, 2, 2, 1), np.uint8))
  make = lambda s: data.train_batch(ds, s, 8, seed=3)
  got = list(data.prefetch(make, range(5, 17), depth=3))
  assert [s for s, _ in got] == list(range(5, 17))
  for s, b in got:
    np.testing.assert_array_equal(b, make(s))
  gen = data.prefetch(make, range(100))
  next(gen)
  gen.close()  # must not hang or leak a running thread's work
  with pytest.raises(ValueError, match="depth"):
    next(data.prefetch(make, range(3), depth=0))


def test_config_rejects_bad_attention_chunk():
  c = _tiny_config()
  c.model.attention_chunk = -2
  with pytest.raises(config_lib.ConfigError, match="model.attention_chunk"):
    config_lib.validate(c)
