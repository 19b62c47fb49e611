"""The CPU kernels as JAX functions: XLA FFI custom calls with custom VJPs.

* `conv_general_dilated`: `lax.conv_general_dilated`'s signature on oneDNN's
  convolutions (csrc/onednn_conv.cc) for the 2-D NHWC float32 case, XLA's op otherwise;
  3x3 'SAME' convolutions at 16-128 channels run Winograd's F(4x4, 3x3) where the CPU
  has AVX-512 (csrc/winograd.cc, `conv2d`), which also adds a bias and residuals.
* `attention` (csrc/attention.cc): softmax(q k^T / sqrt(C)) v in row tiles that stay in
  cache, the [N, N] weights recomputed in the backward pass.
* `group_norm` (csrc/group_norm.cc): `reference.group_norm` with each example's
  statistics, affine map and output computed while the example is in cache.
* `materialize`: an identity XLA must compute into memory.

Each computes the same function as its pure-JAX form to float32 round-off (the tests in
this package). A custom call has no SPMD partitioning rule: `vdmrep.backends` uses them
for single-device CPU programs only.

The shared library is compiled by build.py (`python -m vdmrep.backends.cpu.build`),
once per (sources, oneDNN, jaxlib, CPU) into $VDMREP_KERNEL_CACHE (default
~/.cache/vdmrep/kernels) with $CXX (default g++), against the oneDNN of the `cpu` extra.
Nothing here compiles as a side effect: `load()` only loads a library already built, and
only after libcache.py's checks (owner and mode of the cache, the digest its build
recorded).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vdmrep.backends.cpu import libcache

_CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(_CSRC / f for f in ("onednn_conv.cc", "attention.cc", "group_norm.cc",
                                    "winograd.cc"))
HEADERS = (_CSRC / "vec_math.h",)
_TARGETS = {"vdmrep_conv_forward": "VdmrepConvForward",
            "vdmrep_conv_input_grad": "VdmrepConvInputGrad",
            "vdmrep_conv_filter_grad": "VdmrepConvFilterGrad",
            "vdmrep_conv_materialize": "VdmrepMaterialize",
            "vdmrep_attention_forward": "VdmrepAttentionForward",
            "vdmrep_attention_backward": "VdmrepAttentionBackward",
            "vdmrep_group_norm_forward": "VdmrepGroupNormForward",
            "vdmrep_group_norm_backward": "VdmrepGroupNormBackward",
            "vdmrep_group_norm_parts_forward": "VdmrepGroupNormPartsForward",
            "vdmrep_group_norm_parts_backward": "VdmrepGroupNormPartsBackward",
            "vdmrep_winograd_forward": "VdmrepWinogradForward",
            "vdmrep_winograd_filter_grad": "VdmrepWinogradFilterGrad"}
_NHWC = ("NHWC", "HWIO", "NHWC")


def _cpu_flags() -> bytes:
  """The CPU's feature flags (-march=native code is only valid where they match)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line.encode()
  except OSError:
    pass
  return platform.processor().encode()


def onednn_prefix() -> Path:
  """The install prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so."""
  candidates = [os.environ.get("VDMREP_ONEDNN_PREFIX"), sys.prefix,
                sysconfig.get_paths().get("data")]
  for c in candidates:
    if c and (Path(c) / "include/oneapi/dnnl/dnnl.hpp").exists() and any(
        (Path(c) / "lib").glob("libdnnl.so*")):
      return Path(c)
  raise OSError("oneDNN headers/library not found (looked in "
                f"{[c for c in candidates if c]}); install the `cpu` extra "
                "(pip install -e '.[cpu]') or set "
                "VDMREP_ONEDNN_PREFIX")


def library_path() -> Path:
  """Where the library for these sources, this oneDNN, jaxlib and CPU is (or will be)."""
  prefix = onednn_prefix()
  src = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
  tag = hashlib.sha256(src + str(prefix).encode() + jax.__version__.encode()
                       + _cpu_flags()).hexdigest()[:16]
  return libcache.root() / tag / libcache.LIBRARY


@functools.cache
def _load() -> ctypes.CDLL:
  """Loads the built library and registers its FFI handlers; raises OSError (never builds).

  Only a library that passes `libcache.verified_library` (owner, mode, the digest its
  build recorded) is opened: loading runs a library's code.
  """
  lib_path = library_path()
  with libcache.verified_library(lib_path) as path:
    lib = ctypes.CDLL(path)
  missing = [s for s in list(_TARGETS.values()) + ["VdmrepWinogradAvailable"]
             if not hasattr(lib, s)]
  if missing:
    raise OSError(f"the CPU kernels {lib_path} lack {missing[0]} (built from other "
                  f"sources?); rebuild them with {libcache.BUILD} --force")
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def load() -> None:
  """Loads the built library (registering its handlers); raises OSError if not built."""
  _load()


def unavailable_reason() -> str | None:
  """None when the kernels are built and can run here, else why not (one line)."""
  if jax.default_backend() != "cpu":
    return f"the default JAX backend is {jax.default_backend()}, not cpu"
  try:
    _load()
  except OSError as e:
    return str(e)
  return None


def _call(kind, out_shape, a, b, strides, pads):
  (ph_lo, ph_hi), (pw_lo, pw_hi) = pads
  f = jax.ffi.ffi_call(f"vdmrep_conv_{kind}", jax.ShapeDtypeStruct(out_shape, jnp.float32),
                       vmap_method="sequential")
  i64 = np.int64
  return f(a, b, stride_h=i64(strides[0]), stride_w=i64(strides[1]), pad_h_lo=i64(ph_lo),
           pad_h_hi=i64(ph_hi), pad_w_lo=i64(pw_lo), pad_w_hi=i64(pw_hi))


def _out_shape(x_shape, w_shape, strides, pads):
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  ow = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
  return (n, oh, ow, o)


# Winograd F(M x M, 3x3) (winograd.cc), M = 4 by default, 2 on request. Where
# `_winograd_ok` holds, the forward pass and the input gradient run the Winograd kernel
# (the input gradient is the forward of dy with the filter rotated by 180 degrees,
# channels swapped) and the filter gradient its transpose; elsewhere oneDNN's direct
# convolution. The filter transforms U = G w G^T and dw = G^T dU G are done here.
WINOGRAD_CHANNELS = (16, 32, 64, 128)
WINOGRAD_TILES = (2, 4)
WINOGRAD_DEFAULT_TILE = 4  # faster than 2 in the whole train step (README.md here)

# G [M + 2, 3] of F(M x M, 3x3): F(2x2) from points 0, +-1, infinity; F(4x4) from 0,
# +-1, +-2, infinity (Lavin & Gray 2016), as in winograd.cc's B^T and A^T.
_G = {
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
}


def winograd_available() -> bool:
  """True where the Winograd kernel was compiled (it needs AVX-512; see winograd.cc)."""
  try:
    return bool(_load().VdmrepWinogradAvailable())
  except OSError:
    return False


def _winograd_ok(x_shape, w_shape, strides, pads) -> bool:
  """Whether conv2d takes the Winograd kernel: a 3x3 filter, stride 1, one pixel of zero
  padding on every side, input and output channels in WINOGRAD_CHANNELS."""
  return (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
          and tuple(pads) == ((1, 1), (1, 1)) and w_shape[2] in WINOGRAD_CHANNELS
          and w_shape[3] in WINOGRAD_CHANNELS and x_shape[1] * x_shape[2] > 0
          and winograd_available())


def _rows(matrix, x, axis):
  """The constant `matrix` [R, K] applied along `axis` (length K -> R), written as
  scaled adds so that XLA fuses a whole transform into one small loop (as einsums they
  were many tiny dots, each its own loop)."""
  parts = [lax.index_in_dim(x, k, axis) for k in range(len(matrix[0]))]
  rows = []
  for row in matrix:
    terms = [p if c == 1 else c * p for c, p in zip(row, parts) if c != 0]
    rows.append(functools.reduce(jnp.add, terms))
  return jnp.concatenate(rows, axis)


def winograd_filter(w, tile=4):
  """U = G w G^T: f32 [3, 3, C, O] -> [(tile + 2)^2, C, O] (row-major over the tile)."""
  g = _G[tile]
  return _rows(g, _rows(g, w, 0), 1).reshape((len(g) ** 2,) + w.shape[2:])


_NONE = np.zeros((0,), np.float32)  # an absent optional operand of the Winograd forward


def _winograd(x, u, bias=None, residuals=()):
  """x f32 [B, H, W, C], u [K, C, O] -> the 3x3 'SAME' cross-correlation [B, H, W, O],
  plus bias [O] and up to two residuals [B, H, W, O] where given (added as the kernel
  stores y)."""
  out = jax.ShapeDtypeStruct(x.shape[:3] + u.shape[2:], jnp.float32)
  r = tuple(residuals) + (_NONE,) * (2 - len(residuals))
  return jax.ffi.ffi_call("vdmrep_winograd_forward", out, vmap_method="sequential")(
      x, u, _NONE if bias is None else bias, *r)


def _winograd_filter_grad(x, dy, tile):
  """(dL/dw [3, 3, C, O] = G^T dU G, dL/dbias [O] = dy summed over B, H, W) from x
  [B, H, W, C] and dy [B, H, W, O]."""
  a = tile + 2
  du, db = jax.ffi.ffi_call(
      "vdmrep_winograd_filter_grad",
      (jax.ShapeDtypeStruct((a * a, x.shape[-1], dy.shape[-1]), jnp.float32),
       jax.ShapeDtypeStruct(dy.shape[-1:], jnp.float32)), vmap_method="sequential")(x, dy)
  gt = tuple(zip(*_G[tile]))
  return _rows(gt, _rows(gt, du.reshape((a, a) + du.shape[1:]), 0), 1), db


def conv2d(x, w, strides, pads, winograd=None, *, bias=None, residual=None):
  """x: f32 [N, H, W, C], w: f32 [KH, KW, C, O] -> f32 [N, OH, OW, O].

  strides: (sh, sw); pads: ((lo, hi), (lo, hi)), non-negative, as in
  `lax.conv_general_dilated`. Cross-correlation (no filter flip), like XLA's op.
  bias [O] and residual [N, OH, OW, O] (or a tuple of up to two such arrays), where
  given, are added to the result: on the Winograd path inside the kernel (and the bias
  gradient comes from the filter gradient's kernel), so none costs a pass over memory;
  otherwise in XLA.
  winograd: None takes Winograd's F(4x4, 3x3) where `_winograd_ok` holds, False never
  (oneDNN's direct convolution); True, 4 or 2 insist on F(4x4) or F(2x2) (ValueError
  where it cannot apply). F(4x4) does 1/4 of the direct form's multiply-adds, F(2x2)
  4/9 with about 1/10 of F(4x4)'s round-off (tests/test_winograd.py).
  """
  strides, pads = tuple(strides), tuple(tuple(p) for p in pads)
  ok = _winograd_ok(x.shape, w.shape, strides, pads)
  if winograd is None:
    tile = WINOGRAD_DEFAULT_TILE if ok else 0
  elif winograd is False:
    tile = 0
  else:
    tile = WINOGRAD_DEFAULT_TILE if winograd is True else winograd
    if tile not in WINOGRAD_TILES:
      raise ValueError(f"conv2d: winograd must be None, a bool or a tile size in "
                       f"{WINOGRAD_TILES}, got {winograd!r}")
    if not ok:
      raise ValueError(f"conv2d: no Winograd kernel for x {x.shape}, w {w.shape}, strides "
                       f"{strides}, pads {pads} (3x3, stride 1, pads 1, channels in "
                       f"{WINOGRAD_CHANNELS}, AVX-512)")
  out_shape = _out_shape(x.shape, w.shape, strides, pads)
  if bias is not None and tuple(bias.shape) != out_shape[3:]:
    raise ValueError(f"conv2d: bias must be [{w.shape[3]}], got {tuple(bias.shape)}")
  residuals = () if residual is None else (
      tuple(residual) if isinstance(residual, (tuple, list)) else (residual,))
  if len(residuals) > 2:
    raise ValueError(f"conv2d: at most two residuals, got {len(residuals)}")
  for r in residuals:
    if tuple(r.shape) != out_shape:
      raise ValueError(f"conv2d: residual must be the output's shape {out_shape}, got "
                       f"{tuple(r.shape)}")
  return _conv2d(x, w, bias, residuals, strides, pads, tile, bias is None, len(residuals))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _conv2d(x, w, bias, residuals, strides, pads, tile, no_bias, n_residuals):
  """tile: 0 for oneDNN's direct convolution, else Winograd's output tile size; bias may
  be None and residuals is a tuple of 0-2 arrays (no_bias and n_residuals say so, for
  the backward pass)."""
  if tile:
    return _winograd(x, winograd_filter(w, tile), bias, residuals)
  y = _call("forward", _out_shape(x.shape, w.shape, strides, pads), x, w, strides, pads)
  y = y if bias is None else y + bias
  return functools.reduce(jnp.add, residuals, y)


def _conv2d_fwd(x, w, bias, residuals, *static):
  return _conv2d(x, w, bias, residuals, *static), (x, w)


def _conv2d_bwd(strides, pads, tile, no_bias, n_residuals, res, dy):
  x, w = res
  if tile:
    rotated = jnp.flip(w, (0, 1)).swapaxes(2, 3)  # the transposed 'SAME' convolution
    dx = _winograd(dy, winograd_filter(rotated, tile))
    dw, db = _winograd_filter_grad(x, dy, tile)
  else:
    dx = _call("input_grad", x.shape, dy, w, strides, pads)
    dw = _call("filter_grad", w.shape, x, dy, strides, pads)
    db = None if no_bias else jnp.sum(dy, axis=(0, 1, 2))
  return dx, dw, None if no_bias else db, (dy,) * n_residuals


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _hold(x):
  _load()  # trace time only (cached): registers the handler if no convolution has yet
  return jax.ffi.ffi_call("vdmrep_conv_materialize", jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


@jax.custom_vjp
def materialize(x):
  """Identity that XLA must compute into memory, forward and backward (a custom call).

  Why: XLA's CPU compiler drops `lax.optimization_barrier` before fusion, and a
  ResNet stack whose blocks read their input only through fusible elementwise ops
  and reductions (reference.group_norm) let it recompute the residual sums
  x_k = x_0 + h_0 + ... + h_(k-1), and their gradients, inside every later block's
  fusions: quadratic in depth. A custom call's operand is always materialised.
  """
  return _hold(x)


def _materialize_fwd(x):
  return _hold(x), None


def _materialize_bwd(_, g):
  return (_hold(g),)


materialize.defvjp(_materialize_fwd, _materialize_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`'s signature; oneDNN for the supported case, else XLA.

  Raises OSError where the kernels are not built.
  """
  def xla():
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  if lhs.ndim != 4 or rhs.ndim != 4:
    return xla()
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  unit = lambda d: d is None or tuple(d) == (1, 1)
  if (lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or given != nhwc
      or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type not in (None, jnp.float32)
      or not unit(lhs_dilation) or not unit(rhs_dilation)):
    return xla()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(p) for p in pads) < 0:
    return xla()
  _load()
  return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads)


def _attention_call(q, k, v):
  b, n, _ = q.shape
  f = jax.ffi.ffi_call("vdmrep_attention_forward",
                       (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                        jax.ShapeDtypeStruct((b, n), jnp.float32)), vmap_method="sequential")
  return f(q, k, v)


@jax.custom_vjp
def _attention(q, k, v):
  return _attention_call(q, k, v)[0]


def _attention_fwd(q, k, v):
  out, lse = _attention_call(q, k, v)
  # O(B N C) residuals: the backward pass recomputes the [N, N] weights tile by tile.
  return out, (q, k, v, out, lse)


def _attention_bwd(res, d_out):
  grad = jax.ShapeDtypeStruct(res[0].shape, jnp.float32)
  return jax.ffi.ffi_call("vdmrep_attention_backward", (grad, grad, grad),
                          vmap_method="sequential")(*res, d_out.astype(jnp.float32))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v):
  """softmax(q k^T / sqrt(C)) v, one head, f32: q, k, v [B, N, C] -> [B, N, C].

  Same mathematics as `reference.attention` (tests/test_attention.py
  checks values and gradients against it to f32 round-off; the softmax's exponential
  is a polynomial with relative error <= 2.3e-7). Differentiable (custom_vjp); `jax.vmap`
  maps it one call per element. Raises OSError where the kernels cannot be built.
  """
  if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"attention: q, k, v must be equal [B, N, C], got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if any(t.dtype != jnp.float32 for t in (q, k, v)):
    raise ValueError("attention: the kernel is float32 only, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  _load()
  return _attention(q, k, v)


def _gn_call(name, parts, outs, *args, **attrs):
  kind = "parts_" if len(parts) == 2 else ""
  return jax.ffi.ffi_call(f"vdmrep_group_norm_{kind}{name}", outs, vmap_method="sequential")(
      *parts, *args, **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _group_norm(xs, scale, bias, shift, fs, fb, groups, eps, swish):
  return _group_norm_fwd(xs, scale, bias, shift, fs, fb, groups, eps, swish)[0]


def _group_norm_fwd(xs, scale, bias, shift, fs, fb, groups, eps, swish):
  b, h, w, _ = xs[0].shape
  per_channel = jax.ShapeDtypeStruct(shift.shape, jnp.float32)
  y, mu, rstd = _gn_call("forward", xs, (jax.ShapeDtypeStruct((b, h, w, scale.shape[0]),
                                                              jnp.float32),
                                         per_channel, per_channel),
                         scale, bias, shift, fs, fb, groups=np.int64(groups),
                         eps=np.float32(eps), swish=np.int64(swish))
  return y, (xs, mu, rstd, scale, bias, fs, fb)


def _group_norm_bwd(groups, eps, swish, res, dy):
  xs, mu, rstd, scale, bias, fs, fb = res
  per_channel = jax.ShapeDtypeStruct(mu.shape, jnp.float32)
  outs = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in xs) + (per_channel,) * 3
  *dxs, a, bh, dshift = _gn_call("backward", xs, outs, dy.astype(jnp.float32), mu, rstd,
                                 scale, bias, fs, fb, groups=np.int64(groups),
                                 swish=np.int64(swish))
  # a = sum over positions of dL/dz, bh = the same weighted by the normalised input
  # (each [B, C]); z = (xhat scale + bias)(1 + fs) + fb gives the rest.
  film = 1.0 + fs
  return (tuple(dxs), jnp.sum(film * bh, axis=0), jnp.sum(film * a, axis=0), dshift,
          scale * bh + bias * a, a)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, scale, bias, groups: int, eps: float = 1e-6, *, shift=None, film=None,
               swish: bool = False):
  """`reference.group_norm` (float32) as one fused kernel per direction.

  x f32 [B, H, W, C], or a pair (x1 [B, H, W, C1], x2 [B, H, W, C2]) normalised as
  their concatenation on channels (C = C1 + C2) without writing it; scale, bias [C];
  shift [B, C] added to x before normalising; film = (s, b), each [B, C]:
  y * (1 + s) + b; swish last. Returns f32 [B, H, W, C].
  Same mathematics (tests/test_group_norm.py: values and gradients for every
  argument against reference.group_norm to f32 round-off); statistics are two-pass in
  double. Differentiable (custom_vjp); `jax.vmap` maps it one call per element.
  Raises OSError where the kernels cannot be built.
  """
  xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  if len(xs) not in (1, 2) or any(p.ndim != 4 for p in xs) or (
      len(xs) == 2 and xs[0].shape[:3] != xs[1].shape[:3]):
    raise ValueError("group_norm: x must be [B, H, W, C] or two such parts that differ "
                     f"only in C, got {[p.shape for p in xs]}")
  b, c = xs[0].shape[0], sum(p.shape[-1] for p in xs)
  if groups < 1 or c % groups:
    raise ValueError(f"group_norm: {c} channels do not split into {groups} groups")
  if any(p.dtype != jnp.float32 for p in xs):
    raise ValueError(f"group_norm: the kernel is float32 only, got {[p.dtype for p in xs]}")
  f32 = lambda t, shape: (jnp.zeros(shape, jnp.float32) if t is None
                          else jnp.broadcast_to(jnp.asarray(t, jnp.float32), shape))
  fs, fb = (None, None) if film is None else film
  _load()
  return _group_norm(xs, f32(scale, (c,)), f32(bias, (c,)), f32(shift, (b, c)),
                     f32(fs, (b, c)), f32(fb, (b, c)), int(groups), float(eps), bool(swish))
