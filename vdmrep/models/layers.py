"""Building blocks shared by the encoder and the score network (NHWC layout)."""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vdmrep.kernels import onednn


def attention(q, k, v, batch_chunk: int = 0):
  """softmax(q k^T / sqrt(C)) v, one head: q, k, v [B, N, C] -> [B, N, C].

  `batch_chunk` = g > 0 computes g examples at a time (a sequential `lax.map` over
  B / g steps) with a hand-written backward pass (`_chunked_attention`): the same
  mathematics, but each [g, N, N] weight matrix stays in cache instead of the whole
  batch's (157 MB at B = 64, 28x28), and the backward pass recomputes the weights
  from q, k and the saved log-normaliser instead of storing them. On a 2-core CPU
  that made the attention core 2-4x faster forward + backward than the one-shot
  form (whole-step figures in benchmarks/README.md). Step i takes examples
  i, i + B/g, i + 2B/g, ...: with the batch sharded over D devices and g a multiple
  of D, every device works on its own examples and no data moves between devices.
  0 (or a g that does not divide B) computes the whole batch at once with plain
  autodiff, the right choice on accelerators, whose compilers fuse it. On a CPU run
  with conv_impl='onednn', AttnBlock calls the fused kernel `onednn.attention` (same
  mathematics, 1.6-1.9x faster forward + backward again) instead of this function.
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


def default_attention_chunk(setting: int) -> int:
  """config.model.attention_chunk -> examples per attention step (see `attention`).

  -1 (auto): on CPU one example per device (cache locality wins, and a multiple of
  the device count keeps the sharded step free of cross-device traffic); elsewhere 0
  (the whole batch at once).
  """
  if setting >= 0:
    return setting
  return jax.device_count() if jax.default_backend() == "cpu" else 0


CONV_IMPLS = ("auto", "xla", "onednn")


def resolve_conv_impl(setting: str = "auto", compute_dtype: str = "float32") -> str:
  """config.model.conv_impl -> "xla" or "onednn" (same mathematics, see `conv`).

  "auto": oneDNN where it can run and is faster (CPU backend, one device, float32
  compute, kernels built), else XLA. "onednn" insists: ValueError saying why it cannot
  run. The oneDNN custom call has no SPMD partitioning rule, so a program over several
  devices keeps XLA's convolution (whose partitioning gives the one gradient all-reduce).
  "onednn" also folds the GroupNorms (`GroupNorm.fold`, which needs the custom calls'
  `materialize`); "xla" keeps flax's nn.GroupNorm.
  """
  if setting not in CONV_IMPLS:
    raise ValueError(f"conv_impl={setting!r}: expected one of {CONV_IMPLS}")
  if setting == "xla":
    return "xla"
  reason = None
  if compute_dtype != "float32":
    reason = f"compute_dtype={compute_dtype!r} (the oneDNN kernels are float32)"
  elif jax.device_count() > 1:
    reason = (f"{jax.device_count()} devices (a custom call is not partitioned "
              "across devices)")
  else:
    reason = onednn.unavailable_reason()
  if reason is None:
    return "onednn"
  if setting == "onednn":
    raise ValueError(f"conv_impl='onednn' cannot run here: {reason}")
  return "xla"


def conv(features: int, kernel_size, conv_impl: str = "xla", **kwargs) -> nn.Conv:
  """`nn.Conv` (same parameters) computed by XLA's op or by oneDNN ("onednn").

  The two agree to float32 round-off in values and gradients
  (tests/test_onednn_conv.py); oneDNN is 2-3x faster on CPU (benchmarks/conv_forms.py).
  """
  fn = onednn.conv_general_dilated if conv_impl == "onednn" else None
  return nn.Conv(features, kernel_size, conv_general_dilated=fn, **kwargs)


def num_groups(channels: int) -> int:
  """GroupNorm groups for the score network: min(C // 4, 32), as the VDM ports use."""
  return max(1, min(channels // 4, 32))


def group_norm(x, scale, bias, groups: int, eps: float = 1e-6, *, shift=None, film=None,
               swish: bool = False, dtype=None):
  """GroupNorm of NHWC x (+ optional conditioning shift, FiLM and swish) as one affine map.

  x [B, H, W, C]; scale, bias [C] (GroupNorm's parameters); shift [B, C] is added to x
  before normalising (a time-conditioning projection); film = (s, b), each [B, C],
  modulates the normalised features as y * (1 + s) + b; swish applies swish last.
  Returns [B, H, W, C] in `dtype` (default x.dtype); statistics and the map in float32.

  The same function as flax's nn.GroupNorm followed by those ops (tests/test_perf.py:
  float32 round-off in values and gradients), computed differently because XLA's CPU
  backend reduces flax's [B, H, W, G, C/G] view slowly: here per-channel moments over
  H x W (C stays the minor, vectorised axis), group statistics by the law of total
  variance on [B, C] arrays, and everything per (example, channel) folded into one
  scale and offset, so the big tensor is read once for the moments and once for
  act(x * scale + offset): the conditioning add and FiLM cost no pass of their own.
  On CPU at 32-64 channels: forward 2.5-3x, forward + backward 1.2-1.9x faster than
  flax's form (benchmarks/gn_forms.py; whole-step figures in benchmarks/README.md).
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


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters (scale, bias [C], float32), with the optional `shift`,
  `film` and `swish` of `group_norm`; checkpoints of either module load into the other.

  fold=True computes it all as `group_norm` does, for the oneDNN path only: in float32
  through the fused kernel `onednn.group_norm` (one read of each example from memory,
  forward and backward), otherwise with `group_norm` itself (which needs each ResNet
  block's output held in memory: `onednn.materialize`). fold=False runs nn.GroupNorm
  itself (whose reshaped reductions keep XLA from fusing across blocks on its own) and
  the add, FiLM and swish as separate ops.
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: Optional[jnp.dtype] = None
  fold: bool = False

  def uses_kernel(self, dtype) -> bool:
    """Whether an input of `dtype` goes to the fused kernel (which also takes parts)."""
    return self.fold and dtype == jnp.float32 and self.dtype in (None, jnp.float32)

  @nn.compact
  def __call__(self, x, *, shift=None, film=None, swish: bool = False):
    """x [B, H, W, C], or a tuple of parts normalised as their channel concatenation."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    c = sum(p.shape[-1] for p in parts)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.uses_kernel(parts[0].dtype):
      return onednn.group_norm(parts, scale, bias, self.num_groups, self.epsilon,
                               shift=shift, film=film, swish=swish)
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    if self.fold:
      return group_norm(x, scale, bias, self.num_groups, self.epsilon, shift=shift,
                        film=film, swish=swish, dtype=self.dtype)
    if shift is not None:
      x = x + shift[:, None, None, :]
    y = nn.GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype).apply(
        {"params": {"scale": scale, "bias": bias}}, x)
    if film is not None:
      y = y * (1.0 + film[0][:, None, None, :]) + film[1][:, None, None, :]
    return nn.swish(y) if swish else y


class PartsDense(nn.Module):
  """nn.Dense (same parameters, initialisation and checkpoints) over the channel
  concatenation of a tuple of parts: sum_i part_i @ kernel[rows of part i] + bias.

  conv_impl="onednn": each product of [B, H, W, C_i] parts is oneDNN's 1x1 convolution
  (with the attention projections also on it, the TVDM+TE step 12-16% faster than with
  XLA's dots: benchmarks/README.md)."""
  features: int
  dtype: Optional[jnp.dtype] = None
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, parts, unsummed: bool = False):
    """parts: a tuple of [..., C_i] arrays. unsummed=True returns (the tuple of the
    parts' products, the bias) for a consumer that adds them itself (Conv3x3)."""
    c = sum(p.shape[-1] for p in parts)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (c, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or jnp.result_type(*parts, jnp.float32)  # as nn.Dense promotes
    products, start = [], 0
    for p in parts:
      k = kernel[start:start + p.shape[-1]].astype(dtype)
      if self.conv_impl == "onednn" and p.ndim == 4:
        products.append(onednn.conv_general_dilated(
            p.astype(dtype), k[None, None], (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
      else:
        products.append(lax.dot_general(p.astype(dtype), k, (((p.ndim - 1,), (0,)), ((), ()))))
      start += p.shape[-1]
    if unsummed:
      return tuple(products), bias.astype(dtype)
    return functools.reduce(jnp.add, products) + bias.astype(dtype)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3)) ('SAME', stride 1; same parameters, initialisation and
  checkpoints) whose result may have residuals and a further bias added:
  y = conv(x) + bias (+ extra_bias) (+ residual, or the sum of a tuple of residuals).

  On the oneDNN path in float32 the Winograd kernel adds the bias and up to two
  residuals as it stores each output tile, and its filter gradient returns the bias
  gradient, so a ResNet block's bias add, shortcut add (an up block's shortcut is two
  products, one per [h, skip] part, with its bias in extra_bias) and bias-gradient sum
  cost no passes of their own (onednn.conv2d); elsewhere XLA's convolution and adds."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  conv_impl: str = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, residual=None, extra_bias=None):
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if extra_bias is not None:
      bias = bias + extra_bias
    residuals = () if residual is None else (
        tuple(residual) if isinstance(residual, (tuple, list)) else (residual,))
    if (self.conv_impl == "onednn" and self.dtype == jnp.float32 and len(residuals) <= 2
        and all(a.dtype == jnp.float32 for a in (x, bias) + residuals)):
      return onednn.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), bias=bias,
                           residual=residuals)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    return functools.reduce(jnp.add, residuals, y)


class ResnetBlock(nn.Module):
  """Pre-activation ResNet block: norm, swish, conv, (+cond), norm, swish, dropout, conv.

  `cond` [B, E] is added after the first conv through a zero-initialised projection
  (VDM's time conditioning). `film` [B, F], if given, scales and shifts the second
  normalised features per channel (h * (1 + s) + b, zero-initialised so a fresh block
  is unconditioned): the diffusion-autoencoder way of conditioning on a latent.
  """
  out_ch: Optional[int] = None
  groups: Optional[int] = None
  dropout: float = 0.0
  norm_eps: float = 1e-6
  zero_init_out: bool = False  # VDM starts each score-net block as the identity
  conv_impl: str = "xla"  # "xla" | "onednn" (resolved, see resolve_conv_impl)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond=None, film=None, deterministic: bool = True):
    """x [B, H, W, C], or a tuple of parts taken as their channel concatenation (the
    U-Net's [h, skip]; where the norm runs on the fused kernel the concatenation is
    never written: the norm and the 1x1 shortcut read the parts)."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    c_in = sum(p.shape[-1] for p in parts)
    out_ch = self.out_ch or c_in
    g_in = self.groups or num_groups(c_in)
    g_out = self.groups or num_groups(out_ch)
    fold = self.conv_impl == "onednn"
    norm = functools.partial(GroupNorm, epsilon=self.norm_eps, dtype=self.dtype, fold=fold)
    norm1 = norm(g_in, name="norm1")
    if len(parts) > 1 and (c_in == out_ch or not norm1.uses_kernel(parts[0].dtype)):
      parts = (jnp.concatenate(parts, axis=-1),)

    def conv3x3(name, init=nn.initializers.lecun_normal()):
      if fold:  # bias and conv2's residual added inside the kernel (Conv3x3)
        return Conv3x3(out_ch, init, self.conv_impl, self.dtype, name=name)
      return conv(out_ch, (3, 3), self.conv_impl, kernel_init=init, dtype=self.dtype,
                  name=name)

    h = norm1(parts, swish=True)
    h = conv3x3("conv1")(h)
    shift = None
    if cond is not None:
      shift = nn.Dense(out_ch, use_bias=False, kernel_init=nn.initializers.zeros,
                       dtype=self.dtype, name="cond_proj")(cond)
    if film is not None:
      film = jnp.split(nn.Dense(2 * out_ch, kernel_init=nn.initializers.zeros,
                                dtype=self.dtype, name="film")(film), 2, axis=-1)
    # h + cond, normalised, FiLM-modulated, swish: one pass (see group_norm).
    h = norm(g_out, name="norm2")(h, shift=shift, film=film, swish=True)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    conv2 = conv3x3("conv2", nn.initializers.zeros if self.zero_init_out
                    else nn.initializers.lecun_normal())
    if not fold:
      if c_in == out_ch:
        return parts[0] + conv2(h)
      return nn.Dense(out_ch, dtype=self.dtype, name="nin_shortcut")(parts[0]) + conv2(h)
    residual, shortcut_bias = parts[0], None
    if c_in != out_ch:  # the shortcut's per-part products and bias, added by conv2
      residual, shortcut_bias = PartsDense(out_ch, dtype=self.dtype, conv_impl=self.conv_impl,
                                           name="nin_shortcut")(parts, unsummed=True)
    # Folded norms read the block's input only through fusible ops: without this the
    # residual sums (here their gradients) would be recomputed in every later block
    # (see onednn.materialize).
    return onednn.materialize(conv2(h, residual=residual, extra_bias=shortcut_bias))


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual connection."""
  groups: Optional[int] = None
  norm_eps: float = 1e-6
  batch_chunk: int = 0  # see `attention`
  fold_norm: bool = False  # GroupNorm.fold (its input is a materialised block output)
  conv_impl: str = "xla"  # "onednn": the fused CPU kernel (onednn.attention), no chunks
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.groups or num_groups(c), epsilon=self.norm_eps, dtype=self.dtype,
                  fold=self.fold_norm, name="norm")(x)
    # nn.Dense's parameters; on the oneDNN path its 1x1 convolution (see PartsDense).
    dense = lambda name, h: PartsDense(c, dtype=self.dtype, conv_impl=self.conv_impl,
                                       name=name)((h,)).reshape(b, hgt * wid, c)
    q, k, v = dense("q", h), dense("k", h), dense("v", h)
    if self.conv_impl == "onednn":
      h = onednn.attention(q, k, v)
    else:
      h = attention(q, k, v, self.batch_chunk)
    return x + dense("out", h.reshape(b, hgt, wid, c)).reshape(x.shape)
