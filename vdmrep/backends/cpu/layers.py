"""Drop-in blocks for vdmrep.models on the CPU kernels, with the same parameter trees.

Each class has the constructor fields and the parameters (names, shapes, float32,
initialisers) of the plain block it replaces, so a checkpoint written with either loads
into the other (tests/test_portability.py). What changes is how the block is computed:

* `GroupNorm` (for nn.GroupNorm): the whole norm, with a ResNet block's conditioning
  shift, FiLM and swish, as one affine map per (example, channel), in float32 through
  the fused kernel `kernels.group_norm` (one read of the activation each way).
* `Dense` (for nn.Dense): over a tuple of parts, the sum of each part's product with
  its rows of the kernel (the concatenation is never written); products of [B, H, W, C]
  parts run as oneDNN 1x1 convolutions.
* `Conv3x3` (nn.Conv(features, (3, 3))): the Winograd kernel adds the bias and up to
  two residuals as it stores each output tile (`kernels.conv2d`).
* `ResnetBlock`: the plain block's mathematics from those pieces; its output goes
  through `kernels.materialize` (see there why).
* the attention block: the plain one with the folded norm, the 1x1-convolution
  projections and the fused attention kernel `kernels.attention` (`modules`).
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from vdmrep.backends.cpu import kernels
from vdmrep.backends.cpu.reference import group_norm
from vdmrep.models import layers


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters (scale, bias [C], float32) and constructor, plus the
  optional `shift`, `film` and `swish` of `reference.group_norm`, folded into one map.

  A float32 input runs the fused kernel (which also takes a pair of parts, normalised as
  their channel concatenation); other dtypes run `reference.group_norm` in XLA.
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: Optional[jnp.dtype] = None

  def uses_kernel(self, dtype) -> bool:
    """Whether an input of `dtype` goes to the fused kernel (which also takes parts)."""
    return dtype == jnp.float32 and self.dtype in (None, jnp.float32)

  @nn.compact
  def __call__(self, x, *, shift=None, film=None, swish: bool = False):
    """x [B, H, W, C], or a tuple of parts normalised as their channel concatenation."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    c = sum(p.shape[-1] for p in parts)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.uses_kernel(parts[0].dtype):
      return kernels.group_norm(parts, scale, bias, self.num_groups, self.epsilon,
                                shift=shift, film=film, swish=swish)
    return group_norm(layers.channel_concat(parts), scale, bias, self.num_groups,
                      self.epsilon, shift=shift, film=film, swish=swish, dtype=self.dtype)


class Dense(nn.Module):
  """nn.Dense (same parameters, initialisation and checkpoints) over an array or over the
  channel concatenation of a tuple of parts: sum_i part_i @ kernel[rows of i] + bias.

  Products of [B, H, W, C_i] float32 parts are oneDNN 1x1 convolutions."""
  features: int
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x, unsummed: bool = False):
    """x: [..., C] or a tuple of [..., C_i]. unsummed=True returns (the tuple of the
    parts' products, the bias) for a consumer that adds them itself (Conv3x3)."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    c = sum(p.shape[-1] for p in parts)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (c, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or jnp.result_type(*parts, jnp.float32)  # as nn.Dense promotes
    products, start = [], 0
    for p in parts:
      k = kernel[start:start + p.shape[-1]].astype(dtype)
      if p.ndim == 4:
        products.append(kernels.conv_general_dilated(
            p.astype(dtype), k[None, None], (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
      else:
        products.append(lax.dot_general(p.astype(dtype), k, (((p.ndim - 1,), (0,)), ((), ()))))
      start += p.shape[-1]
    if unsummed:
      return tuple(products), bias.astype(dtype)
    return functools.reduce(jnp.add, products) + bias.astype(dtype)


# nn.Conv on oneDNN's convolution (XLA's op for what the kernels do not cover).
Conv = functools.partial(nn.Conv, conv_general_dilated=kernels.conv_general_dilated)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3)) ('SAME', stride 1; same parameters, initialisation and
  checkpoints) whose result may have residuals and a further bias added:
  y = conv(x) + bias (+ extra_bias) (+ residual, or the sum of a tuple of residuals).

  In float32 the kernel adds the bias and up to two residuals as it stores each output
  tile and its filter gradient returns the bias gradient, so a ResNet block's bias add,
  shortcut add (an up block's shortcut is two products, one per [h, skip] part, with
  its bias in extra_bias) and bias-gradient sum cost no passes of their own."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
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
    if (self.dtype == jnp.float32 and len(residuals) <= 2
        and all(a.dtype == jnp.float32 for a in (x, bias) + residuals)):
      return kernels.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), bias=bias,
                            residual=residuals)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    return functools.reduce(jnp.add, residuals, y)


class ResnetBlock(nn.Module):
  """`vdmrep.models.layers.ResnetBlock` (same fields, parameters and mathematics) on the
  fused kernels: the conditioning add, FiLM and swish inside the second norm; conv2's
  bias and the shortcut inside the Winograd kernel; an up block's [h, skip] read as two
  parts by the first norm and the 1x1 shortcut, never concatenated."""
  out_ch: Optional[int] = None
  groups: Optional[int] = None
  dropout: float = 0.0
  norm_eps: float = 1e-6
  zero_init_out: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond=None, film=None, deterministic: bool = True):
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    c_in = sum(p.shape[-1] for p in parts)
    out_ch = self.out_ch or c_in
    g_in = self.groups or layers.num_groups(c_in)
    g_out = self.groups or layers.num_groups(out_ch)
    norm = functools.partial(GroupNorm, epsilon=self.norm_eps, dtype=self.dtype)
    norm1 = norm(g_in, name="norm1")
    if len(parts) > 1 and (c_in == out_ch or not norm1.uses_kernel(parts[0].dtype)):
      parts = (jnp.concatenate(parts, axis=-1),)

    h = norm1(parts, swish=True)
    h = Conv3x3(out_ch, dtype=self.dtype, name="conv1")(h)
    shift = None
    if cond is not None:
      shift = nn.Dense(out_ch, use_bias=False, kernel_init=nn.initializers.zeros,
                       dtype=self.dtype, name="cond_proj")(cond)
    if film is not None:
      film = jnp.split(nn.Dense(2 * out_ch, kernel_init=nn.initializers.zeros,
                                dtype=self.dtype, name="film")(film), 2, axis=-1)
    h = norm(g_out, name="norm2")(h, shift=shift, film=film, swish=True)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    init = nn.initializers.zeros if self.zero_init_out else nn.initializers.lecun_normal()
    conv2 = Conv3x3(out_ch, init, self.dtype, name="conv2")
    residual, shortcut_bias = parts[0], None
    if c_in != out_ch:  # the shortcut's per-part products and bias, added by conv2
      residual, shortcut_bias = Dense(out_ch, dtype=self.dtype, name="nin_shortcut")(
          parts, unsummed=True)
    # The folded norms read the block's input only through fusible ops: without this the
    # residual sums (here their gradients) would be recomputed in every later block.
    return kernels.materialize(conv2(h, residual=residual, extra_bias=shortcut_bias))


def modules() -> dict:
  """The block fields of vdmrep.models' Encoder and ScoreNet for this backend (names
  looked up when called, so an A/B script can swap one piece)."""
  attn_block = functools.partial(layers.AttnBlock, norm=GroupNorm, dense=Dense,
                                 attention_fn=kernels.attention)
  return dict(conv=Conv, norm=GroupNorm, resnet_block=ResnetBlock, attn_block=attn_block)
