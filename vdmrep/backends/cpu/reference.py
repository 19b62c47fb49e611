"""Pure-JAX forms of what the CPU kernels compute: the references their tests and A/B
scripts compare against, and the folded GroupNorm for dtypes the kernel does not take."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(x, scale, bias, groups: int, eps: float = 1e-6, *, shift=None, film=None,
               swish: bool = False, dtype=None):
  """GroupNorm of NHWC x (+ optional conditioning shift, FiLM and swish) as one affine map.

  x [B, H, W, C]; scale, bias [C] (GroupNorm's parameters); shift [B, C] is added to x
  before normalising (a time-conditioning projection); film = (s, b), each [B, C],
  modulates the normalised features as y * (1 + s) + b; swish applies swish last.
  Returns [B, H, W, C] in `dtype` (default x.dtype); statistics and the map in float32.

  The same function as flax's nn.GroupNorm followed by those ops (float32 round-off in
  values and gradients, tests/test_reference.py), computed as the fused kernel does:
  per-channel moments over H x W, group statistics by the law of total variance on
  [B, C] arrays, and everything per (example, channel) folded into one scale and
  offset, so the big tensor is read once for the moments and once for
  act(x * scale + offset).
  """
  b, h, w, c = x.shape
  if c % groups:
    raise ValueError(f"group_norm: {c} channels do not split into {groups} groups")
  x32 = x.astype(jnp.float32)
  n = h * w
  mean_c = jnp.sum(x32, axis=(1, 2)) / n                          # [B, C]
  # Within-channel variance, as flax's fast variance does it over the whole group.
  var_c = jnp.maximum(jnp.sum(x32 * x32, axis=(1, 2)) / n - mean_c * mean_c, 0.0)
  if shift is not None:
    mean_c = mean_c + shift.astype(jnp.float32)  # a per-channel shift moves the mean only
  grouped = lambda t: t.reshape(-1, groups, c // groups)  # [B or 1, C] -> [., G, C/G]
  mean_g = jnp.mean(grouped(mean_c), axis=-1, keepdims=True)      # [B, G, 1]
  var_g = (jnp.mean(grouped(var_c), axis=-1, keepdims=True)
           + jnp.mean(jnp.square(grouped(mean_c) - mean_g), axis=-1, keepdims=True))
  inv = jax.lax.rsqrt(var_g + eps) * grouped(scale.astype(jnp.float32))  # [B, G, C/G]
  offset = grouped(bias.astype(jnp.float32)) - mean_g * inv
  if shift is not None:
    offset = offset + grouped(shift.astype(jnp.float32)) * inv
  inv, offset = inv.reshape(b, c), offset.reshape(b, c)
  if film is not None:
    gain = 1.0 + film[0].astype(jnp.float32)
    inv, offset = inv * gain, offset * gain + film[1].astype(jnp.float32)
  y = x32 * inv[:, None, None, :] + offset[:, None, None, :]
  if swish:
    y = nn.swish(y)
  return y.astype(dtype or x.dtype)


def attention(q, k, v, batch_chunk: int = 0):
  """softmax(q k^T / sqrt(C)) v, one head: q, k, v [B, N, C] -> [B, N, C], in XLA.

  `batch_chunk` = g > 0 computes g examples at a time (a sequential `lax.map` over
  B / g steps) with a hand-written backward pass (`_chunked_attention`): the same
  mathematics, but each [g, N, N] weight matrix stays in cache instead of the whole
  batch's, and the backward pass recomputes the weights from q, k and the saved
  log-normaliser instead of storing them. Step i takes examples i, i + B/g, ...
  0 (or a g that does not divide B) computes the whole batch at once with plain
  autodiff. The fused kernel `kernels.attention` computes the same function.
  """
  b, _, c = q.shape
  if batch_chunk <= 0 or batch_chunk >= b or b % batch_chunk:
    w = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkc->bqc", w, v)
  return _chunked_attention(q, k, v, batch_chunk)


def _logits(q, k):
  """Scaled attention logits (q / sqrt(C)) k^T [B, N, N], f32 (forward and recompute).

  The scale multiplies q ([B, N, C]) rather than the [B, N, N] product: one pass over
  the small array instead of the large one.
  """
  return jnp.einsum("bqc,bkc->bqk", q * (q.shape[-1] ** -0.5), k).astype(jnp.float32)


def _attention_fwd_core(q, k, v):
  """-> (out [B, N, C], logsumexp of the scaled logits [B, N], f32). Softmax in f32.

  One exponential per logit: e = exp(s - max s) feeds both the normaliser l and the
  product e v, and the [B, N, C] output is divided by l (not the [B, N, N] weights).
  """
  s = _logits(q, k)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum("bqk,bkc->bqc", e.astype(v.dtype), v).astype(jnp.float32) / l
  return out.astype(v.dtype), (m + jnp.log(l))[..., 0]


def _strided_split(t, g):
  """[B, ...] -> [B / g, g, ...]; step i holds examples i, i + B/g, ... (see `attention`)."""
  return jnp.swapaxes(t.reshape((g, t.shape[0] // g) + t.shape[1:]), 0, 1)


def _strided_merge(t):
  t = jnp.swapaxes(t, 0, 1)
  return t.reshape((-1,) + t.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_attention(q, k, v, g):
  return _chunked_attention_fwd(q, k, v, g)[0]


def _chunked_attention_fwd(q, k, v, g):
  out, lse = jax.lax.map(lambda a: _attention_fwd_core(*a),
                         tuple(_strided_split(t, g) for t in (q, k, v)))
  out = _strided_merge(out)
  # Residuals are O(B N C): the [B, N, N] weights are recomputed in the backward pass.
  return out, (q, k, v, out, _strided_merge(lse))


def _chunked_attention_bwd(g, res, d_out):
  def one(args):
    q, k, v, out, lse, d_out = args
    scale = q.shape[-1] ** -0.5
    w = jnp.exp(_logits(q, k) - lse[..., None])  # the forward's softmax weights, f32
    dv = jnp.einsum("bqk,bqc->bkc", w.astype(v.dtype), d_out)
    dw = jnp.einsum("bqc,bkc->bqk", d_out, v).astype(jnp.float32)
    # d softmax: w * (dw - sum_k w dw), and sum_k w dw = <d_out, out> per query. The
    # logits' scale is applied to the [B, N, C] gradients, not to this [B, N, N] array.
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    ds = (w * (dw - row)).astype(q.dtype)
    dq = jnp.einsum("bqk,bkc->bqc", ds, k) * scale
    dk = jnp.einsum("bqk,bqc->bkc", ds, q) * scale
    return dq, dk, dv

  parts = jax.lax.map(one, tuple(_strided_split(t, g) for t in res + (d_out,)))
  return tuple(_strided_merge(t) for t in parts)


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)
