"""The speed-ups leave the mathematics unchanged: loss values and gradients agree with
the straightforward forms to float tolerance (and mixed precision stays close)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import collapse, config_lib, data, losses
from vdmrep.models import build_model
import flax.linen as nn

from vdmrep.models.layers import ResnetBlock, attention


def _recon_reference(x, z, g0, vocab=256):
  """Pick x from the full [..., vocab] log-softmax (the textbook form)."""
  logp = losses.reconstruction_logits(z, g0, vocab)
  return -jnp.sum(jnp.take_along_axis(logp, x[..., None].astype(jnp.int32), -1)[..., 0],
                  axis=(1, 2, 3))


@pytest.mark.slow
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
  """(params, x, (loss, grads)) of the plain flax model."""
  return _loss_and_grads(_tiny_config())


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(remat=True)])
def test_fast_variants_leave_loss_and_gradients_unchanged(plain, variant):
  """Remat vs the plain model, same params."""
  params, x, (loss_ref, g_ref) = plain
  _, _, (loss, g) = _loss_and_grads(_tiny_config(**variant), params, x)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  _assert_trees_close(g, g_ref, rtol=1e-5)


@pytest.mark.slow
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
  hlo = jax.jit(lambda p: model.elbo_terms(p, x, jax.random.key(3)).diffusion).lower(
      params).as_text()
  assert "bf16" in hlo and "convolution" in hlo


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
def test_resnet_block_matches_the_textbook_form(c_in, out_ch):
  """A whole ResNet block vs the same block written with flax's ops, random parameters:
  values and parameter gradients."""
  ks = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(ks[0], (2, 6, 6, c_in)) + 0.5
  cond, film = jax.random.normal(ks[1], (2, 10)), jax.random.normal(ks[2], (2, 6))
  block = ResnetBlock(out_ch=out_ch)
  params = block.init(ks[3], x, cond, film)["params"]
  assert ("nin_shortcut" in params) == (c_in != out_ch)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(ks[4], p.shape), params)
  ours = lambda p: block.apply({"params": p}, x, cond, film)
  ref = lambda p: _reference_resnet_block(p, x, cond, film)
  want = ref(params)
  np.testing.assert_allclose(ours(params), want, rtol=0, atol=1e-5 * max(1.0, float(
      jnp.max(jnp.abs(want)))))
  g = jax.grad(lambda p: jnp.sum(jnp.sin(ours(p))))(params)
  g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref(p))))(params)
  _assert_trees_close(g, g_ref, rtol=1e-5)


def test_attention_is_the_softmax_formula():
  """layers.attention (jax.nn.dot_product_attention, one head) vs the formula: values
  and gradients."""
  q, k, v, dout = [jax.random.normal(jax.random.key(i), (4, 10, 6)) for i in range(4)]
  out, vjp = jax.vjp(attention, q, k, v)
  ref, vjp_ref = jax.vjp(_attention_reference, q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(vjp(dout), vjp_ref(dout)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


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
