"""Building blocks shared by the encoder and the score network (NHWC layout).

Plain flax layers. A block takes its convolution, normalisation, dense layer and
attention as fields (`conv: ModuleDef = nn.Conv`, ...), so a faster implementation with
the same parameters can be dropped in without editing the model (see vdmrep/backends).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


def num_groups(channels: int) -> int:
  """GroupNorm groups for the score network: min(C // 4, 32), as the VDM ports use."""
  return max(1, min(channels // 4, 32))


def attention(q, k, v):
  """softmax(q k^T / sqrt(C)) v, one head: q, k, v [B, N, C] -> [B, N, C].

  `jax.nn.dot_product_attention` (softmax in float32; cuDNN's fused kernel where JAX
  picks it on NVIDIA GPUs).
  """
  out = jax.nn.dot_product_attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :])
  return out[:, :, 0, :]


def channel_concat(x):
  """A tuple of [B, H, W, C_i] parts -> their concatenation on channels; arrays pass."""
  if isinstance(x, (tuple, list)):
    return x[0] if len(x) == 1 else jnp.concatenate(x, axis=-1)
  return x


class ResnetBlock(nn.Module):
  """Pre-activation ResNet block: norm, swish, conv, (+cond), norm, (FiLM), swish,
  dropout, conv, plus the (1x1-projected where the width changes) input.

  `cond` [B, E] is added after the first conv through a zero-initialised projection
  (VDM's time conditioning). `film` [B, F], if given, scales and shifts the second
  normalised features per channel (h * (1 + s) + b, zero-initialised so a fresh block
  is unconditioned): the diffusion-autoencoder way of conditioning on a latent.
  """
  out_ch: Optional[int] = None
  groups: Optional[int] = None  # None: num_groups(channels)
  dropout: float = 0.0
  norm_eps: float = 1e-6
  zero_init_out: bool = False  # VDM starts each score-net block as the identity
  dtype: jnp.dtype = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.GroupNorm
  dense: ModuleDef = nn.Dense

  @nn.compact
  def __call__(self, x, cond=None, film=None, deterministic: bool = True):
    """x [B, H, W, C], or a tuple of parts taken as their channel concatenation (the
    U-Net's [h, skip]) -> [B, H, W, out_ch]."""
    x = channel_concat(x)
    c_in = x.shape[-1]
    out_ch = self.out_ch or c_in
    norm = lambda c, name: self.norm(self.groups or num_groups(c), epsilon=self.norm_eps,
                                     dtype=self.dtype, name=name)
    h = nn.swish(norm(c_in, "norm1")(x))
    h = self.conv(out_ch, (3, 3), dtype=self.dtype, name="conv1")(h)
    if cond is not None:
      h = h + nn.Dense(out_ch, use_bias=False, kernel_init=nn.initializers.zeros,
                       dtype=self.dtype, name="cond_proj")(cond)[:, None, None, :]
    if film is not None:
      s, b = jnp.split(nn.Dense(2 * out_ch, kernel_init=nn.initializers.zeros,
                                dtype=self.dtype, name="film")(film), 2, axis=-1)
    h = norm(out_ch, "norm2")(h)
    if film is not None:
      h = h * (1.0 + s[:, None, None, :]) + b[:, None, None, :]
    h = nn.swish(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    init = nn.initializers.zeros if self.zero_init_out else nn.initializers.lecun_normal()
    h = self.conv(out_ch, (3, 3), kernel_init=init, dtype=self.dtype, name="conv2")(h)
    if c_in != out_ch:
      x = self.dense(out_ch, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual connection:
  x + out(attention(q(h), k(h), v(h))), h = norm(x); x [B, H, W, C] -> [B, H, W, C]."""
  groups: Optional[int] = None  # None: num_groups(channels)
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  norm: ModuleDef = nn.GroupNorm
  dense: ModuleDef = nn.Dense
  attention_fn: Callable = attention  # q, k, v [B, N, C] -> [B, N, C]

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = self.norm(self.groups or num_groups(c), epsilon=self.norm_eps, dtype=self.dtype,
                  name="norm")(x)
    dense = lambda name, h: self.dense(c, dtype=self.dtype, name=name)(h)
    q, k, v = (dense(n, h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
    h = self.attention_fn(q, k, v).reshape(b, hgt, wid, c)
    return x + dense("out", h)
