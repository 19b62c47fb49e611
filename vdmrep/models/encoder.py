"""Gaussian encoder q(w|x): the diffusers-style conv encoder of the reference study.

conv_in -> `layers` ResNet blocks (one block, no downsampling) -> mid block
(ResNet, self-attention, ResNet) -> GroupNorm, swish -> conv_out to one channel ->
flatten -> Dense(2 * latent) -> (mean, logvar). Parameter counts on 28x28x1 are
exactly those of the study's Table 1 (see `tests/test_models.py`).

With num_classes > 0 it is q(w | x, y) of a conditional VAE: a label embedding
(num_classes is the "no label" token, also used when y is None) is concatenated to the
flattened features before the moments layer.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from vdmrep.models.layers import AttnBlock, ModuleDef, ResnetBlock


@dataclasses.dataclass(frozen=True)
class EncoderSize:
  channels: int
  layers: int
  groups: int
  latent: int


# `ue` is `oe` trained without the KL term (the objective, not the network, differs).
ENCODER_SIZES = {
    "oepp": EncoderSize(channels=64, layers=2, groups=32, latent=256),
    "oe": EncoderSize(channels=64, layers=2, groups=32, latent=128),
    "se": EncoderSize(channels=32, layers=1, groups=16, latent=128),
    "te": EncoderSize(channels=16, layers=1, groups=8, latent=128),
    "ue": EncoderSize(channels=64, layers=2, groups=32, latent=128),
}


class Encoder(nn.Module):
  """x in model scale [B, H, W, C] -> (mean, logvar), each [B, latent]. The blocks are
  fields, as in ScoreNet."""
  channels: int
  layers: int
  groups: int
  latent: int
  num_classes: int = 0  # > 0: q(w | x, y)
  dtype: jnp.dtype = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.GroupNorm
  resnet_block: ModuleDef = ResnetBlock
  attn_block: ModuleDef = AttnBlock

  @nn.compact
  def __call__(self, x, y=None, *, deterministic: bool = True):
    h = self.conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(x)
    block = functools.partial(self.resnet_block, groups=self.groups, dtype=self.dtype)
    for i in range(self.layers):
      h = block(name=f"down_{i}")(h, deterministic=deterministic)
    h = block(name="mid_block_1")(h)
    h = self.attn_block(groups=self.groups, dtype=self.dtype, name="mid_attn")(h)
    h = block(name="mid_block_2")(h)
    h = nn.swish(self.norm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
    h = self.conv(1, (3, 3), dtype=self.dtype, name="conv_out")(h)
    h = h.reshape(h.shape[0], -1)
    if self.num_classes:
      y = jnp.full((h.shape[0],), self.num_classes, jnp.int32) if y is None else y
      label = nn.Embed(self.num_classes + 1, self.channels, name="label_embed")(y)
      h = jnp.concatenate([h, label.astype(h.dtype)], axis=-1)
    moments = nn.Dense(2 * self.latent, dtype=self.dtype, name="to_moments")(h)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, logvar


def make_encoder(name: str, dtype=jnp.float32, num_classes=0, latent: int = 0,
                 **modules) -> Encoder | None:
  """The named encoder, or None for `none` (an unconditional VDM); `latent` > 0
  overrides the size's latent dimension (outputs per moment); `modules` are Encoder's
  block fields (conv, norm, resnet_block, attn_block)."""
  if name == "none":
    return None
  s = ENCODER_SIZES[name]
  return Encoder(channels=s.channels, layers=s.layers, groups=s.groups,
                 latent=latent or s.latent, num_classes=num_classes, dtype=dtype, **modules)
