"""The oneDNN convolution (csrc/onednn_conv.cc) computes what XLA's does: values, gradients,
under jit and vmap, and in the whole model's loss; unsupported cases fall back to XLA.

Skipped where the kernels cannot be built (no oneDNN wheels or compiler), except when
VDMREP_REQUIRE_CPU_KERNELS=1 (CI sets it): then that is a failure.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vdmrep import config_lib
from vdmrep.backends.cpu import kernels
from vdmrep import backends
from vdmrep.backends import build_model

_REASON = kernels.unavailable_reason()
if _REASON is not None and os.environ.get("VDMREP_REQUIRE_CPU_KERNELS") == "1":
  raise RuntimeError(f"VDMREP_REQUIRE_CPU_KERNELS=1 but the oneDNN kernels cannot run: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"oneDNN kernels: {_REASON}")

DN = ("NHWC", "HWIO", "NHWC")


def _conv(impl, strides, padding):
  return lambda x, w: impl(x, w, strides, padding, dimension_numbers=DN)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((4, 8, 8, 32), (3, 3, 32, 32), (1, 1), "SAME"),      # the score net's block conv
    ((3, 8, 8, 33), (3, 3, 33, 1), (1, 1), "SAME"),       # conv_out: 1 output channel
    ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), "SAME"),         # stride 2, odd sizes
    ((2, 8, 8, 4), (1, 1, 4, 6), (1, 1), "VALID"),        # 1x1
    ((3, 10, 10, 2), (3, 3, 2, 4), (2, 1), ((1, 0), (2, 1))),  # asymmetric padding
])
@pytest.mark.slow
def test_matches_xla_values_and_gradients(x_shape, w_shape, strides, padding):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape) / np.sqrt(np.prod(w_shape[:3]))
  ref_f, new_f = _conv(lax.conv_general_dilated, strides, padding), _conv(
      kernels.conv_general_dilated, strides, padding)
  ref, vjp_ref = jax.vjp(ref_f, x, w)
  out, vjp = jax.jit(lambda x, w: jax.vjp(new_f, x, w))(x, w)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  # The 3x3 'SAME' case runs Winograd's F(4x4): round-off up to ~5e-6 of the largest
  # output (bounded in test_winograd.py).
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
  dy = jax.random.normal(jax.random.key(2), ref.shape)
  for a, b in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(b))))
  assert "ffi_call" in str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(new_f(x, w)), (0, 1)))(x, w))


def test_same_inputs_same_bits():
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  f = jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(jnp.tanh(_conv(kernels.conv_general_dilated, (1, 1), "SAME")(x, w))),
      (0, 1)))
  a, b = f(x, w), f(x, w)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_vmap_maps_each_element():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  f = lambda impl: jax.vmap(lambda xi: _conv(impl, (1, 1), "SAME")(xi, w))
  np.testing.assert_allclose(f(kernels.conv_general_dilated)(x),
                             f(lax.conv_general_dilated)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["bfloat16", "dilation", "groups", "negative_pad"])
def test_unsupported_cases_fall_back_to_xla(case):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4 if case != "groups" else 2, 4))
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)
  if case == "bfloat16":
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  elif case == "dilation":
    kw["rhs_dilation"] = (2, 2)
  elif case == "groups":
    kw["feature_group_count"] = 2
  else:
    kw["padding"] = ((-1, 0), (0, 0))
  new = lambda x, w: kernels.conv_general_dilated(x, w, **kw)
  assert "ffi_call" not in str(jax.make_jaxpr(new)(x, w))
  np.testing.assert_array_equal(new(x, w), lax.conv_general_dilated(x, w, **kw))


def _model_loss_and_grads(backend, vdm="mvdm", encoder="te"):
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder, c.model.n_blocks, c.model.channels = vdm, encoder, 1, 16
  c.model.backend = backend
  config_lib.validate(c)
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(7), p.shape),
                        params)
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 1)), jnp.uint8)
  def loss(p):
    t = model.elbo_terms(p, x, jax.random.key(3))
    return jnp.mean(t.total)
  step = jax.jit(jax.value_and_grad(loss))
  return step(params), step.lower(params).as_text()


@pytest.mark.slow
def test_model_loss_and_gradients_match_xla():
  """The whole VAE-VDM (encoder + score net, every conv on oneDNN, GroupNorms and
  attention on the fused kernels, block outputs materialised): same loss and gradients
  as with XLA's convolution, flax's GroupNorm and XLA's attention, and no XLA
  convolution left in the program."""
  (loss, g), hlo = _model_loss_and_grads("cpu")
  (loss_ref, g_ref), hlo_ref = _model_loss_and_grads("xla")
  assert "convolution" in hlo_ref and "convolution" not in hlo
  assert "vdmrep_conv_filter_grad" in hlo and "vdmrep_attention_backward" in hlo
  assert "vdmrep_group_norm_backward" in hlo
  assert "vdmrep_winograd_filter_grad" in hlo or not kernels.winograd_available()
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_ref))
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(u, v, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_materialize_is_an_identity_in_both_passes():
  """Values, gradient (also under vmap) pass through unchanged, and the custom call
  holding the value sits in the forward and in the backward program."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  c = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(jax.jit(kernels.materialize)(x), x)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(kernels.materialize(x * 2.0)) * c)))
  np.testing.assert_allclose(grad(x), 2.0 * jnp.cos(2.0 * x) * c, rtol=1e-6)
  np.testing.assert_array_equal(jax.vmap(kernels.materialize)(x), x)
  assert grad.lower(x).as_text().count("vdmrep_conv_materialize") == 2


@pytest.mark.slow
def test_model_is_deterministic_with_concurrent_convolutions():
  """XLA runs the encoder's and the score net's convolutions on different threads at
  once; the kernels must not share state between calls (a shared oneDNN scratchpad
  once made this loss differ by nats from call to call)."""
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder, c.model.backend = "mvdm", "te", "cpu"
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(7), p.shape),
                        params)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)), jnp.uint8)
  f = jax.jit(lambda p: model.elbo_terms(p, x, jax.random.key(5)).diffusion)
  first = np.asarray(f(params))
  for _ in range(15):
    np.testing.assert_array_equal(np.asarray(f(params)), first)


def test_resolve_backend():
  c = config_lib.base_config()
  assert backends.resolve(c.model) == "cpu"  # auto: single CPU device, f32, kernels built
  c.model.backend = "xla"
  assert backends.resolve(c.model) == "xla"
  assert backends.name(build_model(c.model)) == "xla"
  c.model.backend, c.model.compute_dtype = "cpu", "bfloat16"
  assert backends.resolve(c.model) == "xla"  # one line on stderr, then XLA
  c.model.backend = "mkl"
  with pytest.raises(config_lib.ConfigError, match="model.backend"):
    config_lib.validate(c)


def test_falls_back_when_kernels_are_not_built_or_devices_are_many(tmp_path):
  """A fresh process with an empty kernel cache: 'cpu' prints one line naming the build
  command and builds the XLA model, compiling nothing; with 2 devices, XLA as well."""
  script = textwrap.dedent("""
      import sys
      from vdmrep import backends, config_lib
      c = config_lib.base_config()
      c.model.backend = "cpu"
      model = backends.build_model(c.model)
      assert backends.name(model) == "xla"
      """)
  env = dict(os.environ, VDMREP_KERNEL_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-cxx"))
  env.pop("VDMREP_REQUIRE_CPU_KERNELS", None)  # CI sets it; this run expects the fallback
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if "model.backend" in l]
  assert lines == ["model.backend=cpu: using XLA (CPU kernels not built "
                   "(python -m vdmrep.backends.cpu.build))"], out.stderr[-2000:]
  assert not any(tmp_path.iterdir())  # nothing was compiled
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "2 devices" in out.stderr
