"""The Winograd F(4x4, 3x3) and F(2x2, 3x3) convolution kernels (csrc/winograd.cc)
compute the 3x3 'SAME' convolution: values, input and filter gradients against XLA's
convolution at every channel count they are compiled for and odd image sizes; error
against a float64 reference within a stated factor of oneDNN's direct convolution's;
bit-identical between calls and for any OpenMP thread count; the model's block
convolutions run on it; what it does not cover falls back to the direct convolution.

Skipped where the kernels cannot be built, or (except when VDMREP_REQUIRE_CPU_KERNELS=1,
CI) where the CPU lacks AVX-512.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vdmrep import config_lib
from vdmrep.backends.cpu import kernels
from vdmrep.backends import build_model

_REASON = kernels.unavailable_reason()
if _REASON is None and not kernels.winograd_available():
  _REASON = "the Winograd kernel needs AVX-512"
if _REASON is not None and os.environ.get("VDMREP_REQUIRE_CPU_KERNELS") == "1" and (
    kernels.unavailable_reason() is not None):
  raise RuntimeError(f"VDMREP_REQUIRE_CPU_KERNELS=1 but the oneDNN kernels cannot run: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"Winograd kernel: {_REASON}")

SAME = ((1, 1), (1, 1))


def _ref(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), SAME, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


def _conv(x, w, tile=None):
  return kernels.conv2d(x, w, (1, 1), SAME, winograd=tile)


def _case(x_shape, o, seed=0):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  c = x_shape[-1]
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, (3, 3, c, o)) / np.sqrt(9 * c)
  dy = jax.random.normal(kg, x_shape[:3] + (o,))
  return x, w, dy


# Largest error relative to the largest |value| (measured: F(2x2) 3-13e-7, F(4x4) 2-5e-6).
_TOLERANCE = {2: 4e-6, 4: 2e-5}


@pytest.mark.parametrize("tile", [None, 2])
@pytest.mark.parametrize("x_shape,o", [
    ((2, 7, 9, 32), 16),    # odd height and width: partial tiles at both edges
    ((2, 28, 28, 64), 32),  # the U-Net up blocks' first convolution at 28x28
    ((1, 1, 1, 16), 16),    # a single pixel: one tile, most of it padding
    ((2, 5, 6, 128), 64),
    ((3, 8, 8, 16), 128),
    ((2, 14, 13, 32), 64),  # 14 = 3 F(4x4) tiles and a half
])
@pytest.mark.slow
def test_matches_xla_values_and_gradients(x_shape, o, tile):
  x, w, dy = _case(x_shape, o)
  conv = lambda x, w: _conv(x, w, tile)
  vjp = jax.jit(lambda x, w: jax.vjp(conv, x, w))
  (out, pullback), (ref, ref_pullback) = vjp(x, w), jax.vjp(_ref, x, w)
  hlo = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)).lower(x, w, dy).as_text()
  assert "vdmrep_winograd_forward" in hlo and "vdmrep_winograd_filter_grad" in hlo
  assert "vdmrep_conv_" not in hlo  # no direct-convolution call left
  points = (tile or 4) + 2  # the default is F(4x4): u [36, C, O]
  assert f"tensor<{points * points}x{x_shape[-1]}x{o}xf32>" in hlo
  scale = lambda r: float(jnp.max(jnp.abs(r)))
  tol = _TOLERANCE[tile or 4]
  np.testing.assert_allclose(out, ref, rtol=0, atol=tol * scale(ref))
  for got, want in zip(pullback(dy), ref_pullback(dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale(want))


@pytest.mark.slow
@pytest.mark.parametrize("tile", [None, 2, False])
def test_bias_and_residual_inside_the_kernel(tile):
  """conv2d(..., bias=b, residual=r) = conv + b + r, and its gradients in x, w, b and r
  (r's is dy, b's the sum of dy over B, H, W); on the Winograd path both additions
  happen in the forward kernel and the bias gradient comes from the filter-gradient
  kernel: the program has no other addition or reduction over [B, H, W, O]."""
  x, w, dy = _case((3, 9, 10, 32), 64)
  kb, kr = jax.random.split(jax.random.key(7))
  b, r = jax.random.normal(kb, (64,)), 3.0 + jax.random.normal(kr, dy.shape)
  conv = lambda x, w, b, r: kernels.conv2d(x, w, (1, 1), SAME, winograd=tile, bias=b, residual=r)
  ref = lambda x, w, b, r: _ref(x, w) + b + r
  (out, pullback), (want, ref_pullback) = jax.vjp(conv, x, w, b, r), jax.vjp(ref, x, w, b, r)
  tol = _TOLERANCE[tile or 4] if tile is not False else 2e-6
  scale = lambda a: float(jnp.max(jnp.abs(a)))
  np.testing.assert_allclose(out, want, rtol=0, atol=tol * scale(want))
  for name, got, exp in zip("xwbr", pullback(dy), ref_pullback(dy)):
    assert got.shape == exp.shape, name
    np.testing.assert_allclose(got, exp, rtol=0, atol=tol * scale(exp), err_msg=name)
  if tile is not False:
    hlo = jax.jit(lambda *a: jax.vjp(conv, *a)[1](dy)).lower(x, w, b, r).as_text()
    big = "tensor<3x9x10x64xf32>"
    assert not [line for line in hlo.splitlines()
                if big in line and ("stablehlo.add" in line or "stablehlo.reduce" in line)]
  # Either operand alone.
  np.testing.assert_allclose(kernels.conv2d(x, w, (1, 1), SAME, winograd=tile, bias=b),
                             _ref(x, w) + b, rtol=0, atol=tol * scale(want))
  np.testing.assert_allclose(kernels.conv2d(x, w, (1, 1), SAME, winograd=tile, residual=r),
                             _ref(x, w) + r, rtol=0, atol=tol * scale(want))


def test_bias_and_residual_of_the_wrong_shape_are_named():
  x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 16))
  with pytest.raises(ValueError, match=r"bias must be \[16\]"):
    kernels.conv2d(x, w, (1, 1), SAME, bias=jnp.ones((32,)))
  with pytest.raises(ValueError, match="residual must be the output's shape"):
    kernels.conv2d(x, w, (1, 1), SAME, residual=jnp.ones((2, 8, 8, 32)))


def _float64_conv(x, w):
  """The 3x3 'SAME' cross-correlation in numpy float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  b, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j])
             for i in range(3) for j in range(3))


def test_error_against_float64_is_bounded_by_that_of_a_direct_convolution():
  """Winograd's transforms add round-off. On activations of the model's scale (a large
  mean included), F(2x2)'s error stays within 4x oneDNN's direct form's; F(4x4)'s (its
  transforms multiply by up to 5 and the filter's by 1/6 and 1/24) within 15x, 1e-5 of
  the largest output (measured: direct 5-10e-7, F(2x2) 2-4e-7, F(4x4) 2.5-5e-6)."""
  x, w, _ = _case((4, 12, 12, 32), 32)
  x = 3.0 + 2.0 * x  # post-residual activations are not centred
  exact = _float64_conv(x, w)
  form = lambda winograd: np.asarray(jax.jit(
      lambda x, w: kernels.conv2d(x, w, (1, 1), SAME, winograd=winograd))(x, w), np.float64)
  err = {tile: np.max(np.abs(form(tile) - exact)) for tile in (False, 2, 4)}
  largest = np.max(np.abs(exact))
  assert err[2] <= 4.0 * err[False] + 1e-7 and err[2] <= 2e-6 * largest, err
  assert err[4] <= 15.0 * err[False] and err[4] <= 1e-5 * largest, err
  assert err[4] > err[2]  # two different computations: F(4x4) the less accurate


_THREADS_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
from vdmrep.backends.cpu import kernels
x = jax.random.normal(jax.random.key(0), (12, 9, 10, 32))
w = jax.random.normal(jax.random.key(1), (3, 3, 32, 64)) / 17.0
b = jnp.linspace(-1.0, 1.0, 64)
conv = lambda x, w, b, tile: kernels.conv2d(x, w, (1, 1), ((1, 1), (1, 1)), winograd=tile, bias=b)
f = jax.jit(jax.value_and_grad(  # both tile sizes
    lambda x, w, b: jnp.sum(jnp.sin(conv(x, w, b, 4))) + jnp.sum(jnp.cos(conv(x, w, b, 2))),
    (0, 1, 2)))
v, (gx, gw, gb) = f(x, w, b)
np.savez(sys.argv[1], v=np.asarray(v), gx=np.asarray(gx), gw=np.asarray(gw), gb=np.asarray(gb))
"""


@pytest.mark.slow
def test_same_bits_for_any_thread_count(tmp_path):
  """Every output element and every partial filter-gradient sum is computed in a fixed
  order: one thread and two give identical bits, and so do repeated calls."""
  results = []
  for threads in ("1", "2", "2"):
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    out = tmp_path / f"r{len(results)}.npz"
    subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(out)], env=env, check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results.append(np.load(out))
  for other in results[1:]:
    for k in ("v", "gx", "gw", "gb"):
      np.testing.assert_array_equal(other[k], results[0][k], err_msg=k)


def test_vmap_maps_each_element():
  x, w, _ = _case((3, 2, 6, 6, 16), 32)
  np.testing.assert_allclose(jax.vmap(lambda xi: _conv(xi, w))(x),
                             jax.vmap(lambda xi: _ref(xi, w))(x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("x_shape,w_shape,strides,pads", [
    ((2, 8, 8, 5), (3, 3, 5, 32), (1, 1), SAME),    # conv_in: 5 input channels
    ((2, 8, 8, 32), (3, 3, 32, 1), (1, 1), SAME),   # conv_out: one output channel
    ((2, 8, 8, 32), (3, 3, 32, 32), (2, 2), SAME),  # stride 2 (the encoder's)
    ((2, 8, 8, 32), (3, 3, 32, 32), (1, 1), ((0, 0), (0, 0))),  # VALID
    ((2, 8, 8, 32), (1, 1, 32, 32), (1, 1), ((0, 0), (0, 0))),  # 1x1
    ((2, 8, 8, 48), (3, 3, 48, 32), (1, 1), SAME),  # a channel count not compiled
])
def test_other_convolutions_stay_direct(x_shape, w_shape, strides, pads):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape) / 10.0
  f = jax.jit(jax.grad(lambda x, w: jnp.sum(kernels.conv2d(x, w, strides, pads) ** 2), (0, 1)))
  hlo = f.lower(x, w).as_text()
  assert "vdmrep_winograd" not in hlo and "vdmrep_conv_forward" in hlo


def test_insisting_on_it_where_it_does_not_apply_is_an_error():
  with pytest.raises(ValueError, match="no Winograd kernel"):
    kernels.conv2d(jnp.ones((1, 8, 8, 5)), jnp.ones((3, 3, 5, 32)), (1, 1), SAME, winograd=True)
  with pytest.raises(ValueError, match="tile size in"):
    kernels.conv2d(jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16)), (1, 1), SAME, winograd=3)


def test_bad_shapes_are_named():
  x = jnp.ones((2, 8, 8, 32))
  with pytest.raises(Exception, match="vdmrep winograd"):
    jax.block_until_ready(kernels._winograd(x, jnp.ones((16, 16, 32))))  # C mismatch
  with pytest.raises(Exception, match="vdmrep winograd: channels"):
    jax.block_until_ready(kernels._winograd(jnp.ones((2, 8, 8, 48)), jnp.ones((16, 48, 32))))
  with pytest.raises(Exception, match=r"u \[16 or 36, C, O\]"):  # 25 points: no tile
    jax.block_until_ready(kernels._winograd(x, jnp.ones((25, 32, 32))))


def test_model_block_convolutions_run_on_it():
  """MVDM + TE at 8x8, n_blocks = 1: both 3x3 convolutions of every ResNet block (the
  score net's 5 blocks, the encoder's 3) take the kernel, forward, input gradient and
  filter gradient; conv_in and conv_out (5 and 1 channels) and the 1x1 maps stay direct."""
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder, c.model.n_blocks, c.model.channels = "mvdm", "te", 1, 16
  c.model.backend = "cpu"
  config_lib.validate(c)
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  x = jnp.zeros((2, 8, 8, 1), jnp.uint8)
  loss = lambda p: jnp.mean(model.elbo_terms(p, x, jax.random.key(1)).diffusion)
  hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
  n_fwd, n_wgrad = hlo.count("vdmrep_winograd_forward"), hlo.count("vdmrep_winograd_filter_grad")
  assert n_wgrad == 2 * (5 + 3) and n_fwd == 2 * n_wgrad  # forward and input gradient
  # Direct (oneDNN): both models' conv_in and conv_out, the 2 up blocks' 1x1 shortcuts
  # on 2 parts each, and the 2 attention blocks' q, k, v and output projections.
  assert hlo.count("vdmrep_conv_filter_grad") == 2 * 2 + 2 * 2 + 2 * 4
