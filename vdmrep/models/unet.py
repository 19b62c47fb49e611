"""A multi-resolution U-Net score network eps_hat(z_t; gamma_t, w) (DDPM / ADM layout).

conv_in -> for each level l (resolution H / 2^l, width channels * channel_mult[l]):
n_blocks ResNet blocks (self-attention after each at the lowest level), then a
stride-2 convolution down to the next level -> middle (ResNet, self-attention, ResNet)
-> for each level from the lowest: n_blocks + 1 ResNet blocks, each taking the matching
skip on channels, then nearest-neighbour upsampling and a convolution -> norm, swish ->
zero-initialised conv_out, plus z_t. As in Ho et al. (2020) and Dhariwal & Nichol (2021),
with ScoreNet's conditioning (score_net.conditioning_inputs): the normalised gamma_t through a
sinusoidal embedding and an MLP added in every block, w concatenated to that embedding
("additive") or as a zero-initialised FiLM of every block ("film"), optional Fourier
features of z_t. Every ResNet block's last convolution and conv_out start at zero, so an
untrained net predicts eps_hat = z_t exactly, like ScoreNet.

At 28x28 with channel_mult (1, 2, 2) the levels are 28, 14 and 7 pixels: most blocks run
on 4x or 16x fewer positions than ScoreNet's, and attention runs on 49 positions instead
of 784, so the same compute buys wider layers and a larger receptive field.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdmrep.models.layers import AttnBlock, ModuleDef, ResnetBlock, num_groups
from vdmrep.models.score_net import conditioning_inputs, fourier_features


@dataclasses.dataclass(frozen=True)
class UNetSize:
  channels: int
  channel_mult: tuple
  n_blocks: int  # ResNet blocks per level on the way down (one more on the way up)


UNET_SIZES = {
    "unet": UNetSize(32, (1, 2, 2), 2),
    "unet_s": UNetSize(16, (1, 2, 2), 1),
}


class UNet(nn.Module):
  """eps_hat(z_t; gamma_t, w) over len(channel_mult) resolutions. The blocks are fields
  (flax-examples style), so drop-in classes with the same parameters can replace them."""
  channels: int
  channel_mult: Sequence[int] = (1, 2, 2)
  n_blocks: int = 2
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  conditioning: str = "additive"
  dropout: float = 0.0
  use_fourier_features: bool = True
  remat: bool = False  # recompute each ResNet block's activations in the backward pass
  num_classes: int = 0  # > 0: class-conditional (score_net.join_label)
  dtype: jnp.dtype = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.GroupNorm
  resnet_block: ModuleDef = ResnetBlock
  attn_block: ModuleDef = AttnBlock

  @nn.compact
  def __call__(self, z, gamma_t, w=None, y=None, *, deterministic: bool = True):
    """z [B, H, W, C] in model scale (H, W divisible by 2^(levels - 1)); gamma_t scalar or
    [B]; w [B, D] or None; y [B] labels or None -> eps_hat [B, H, W, C]."""
    b, hgt, wid, _ = z.shape
    levels = len(self.channel_mult)
    factor = 2 ** (levels - 1)
    if hgt % factor or wid % factor:
      raise ValueError(f"UNet with {levels} levels needs image sides divisible by {factor}; "
                       f"got {hgt}x{wid}")
    c = self.channels
    cond, film = conditioning_inputs(
        gamma_t, w, y, batch=b, channels=c, gamma_min=self.gamma_min,
        gamma_max=self.gamma_max, conditioning=self.conditioning,
        num_classes=self.num_classes, dtype=self.dtype)

    h = z
    if self.use_fourier_features:
      h = jnp.concatenate([z, fourier_features(z)], axis=-1)
    h = self.conv(c, (3, 3), dtype=self.dtype, name="conv_in")(h.astype(self.dtype))

    # `deterministic` (argument 4, counting self) must stay a Python bool under remat.
    block_cls = (nn.remat(self.resnet_block, static_argnums=(4,)) if self.remat
                 else self.resnet_block)

    def block(name, h, width):
      out = block_cls(out_ch=width, dropout=self.dropout, zero_init_out=True,
                      dtype=self.dtype, name=name)
      return out(h, cond, film, deterministic)

    attend = lambda name, h: self.attn_block(dtype=self.dtype, name=name)(h)
    lowest = levels - 1

    hs = [h]
    for lvl, mult in enumerate(self.channel_mult):
      for i in range(self.n_blocks):
        h = block(f"down_{lvl}_{i}", h, c * mult)
        if lvl == lowest:
          h = attend(f"down_{lvl}_{i}_attn", h)
        hs.append(h)
      if lvl != lowest:
        h = self.conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype,
                      name=f"downsample_{lvl}")(h)
        hs.append(h)

    width = c * self.channel_mult[-1]
    h = block("mid_block_1", h, width)
    h = attend("mid_attn", h)
    h = block("mid_block_2", h, width)

    for lvl in reversed(range(levels)):
      width = c * self.channel_mult[lvl]
      for i in range(self.n_blocks + 1):
        h = block(f"up_{lvl}_{i}", (h, hs.pop()), width)  # [h, skip] on channels
        if lvl == lowest:
          h = attend(f"up_{lvl}_{i}_attn", h)
      if lvl != 0:
        n, hh, ww, ch = h.shape
        h = jax.image.resize(h, (n, 2 * hh, 2 * ww, ch), "nearest")
        h = self.conv(ch, (3, 3), dtype=self.dtype, name=f"upsample_{lvl}")(h)
    assert not hs, "every skip is consumed"

    h = nn.swish(self.norm(num_groups(h.shape[-1]), epsilon=1e-6, dtype=self.dtype,
                           name="norm_out")(h))
    eps_hat = self.conv(z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                        dtype=self.dtype, name="conv_out")(h)
    return z + eps_hat.astype(jnp.float32)


def make_unet(name: str, *, gamma_min, gamma_max, conditioning, dropout,
              use_fourier_features, n_blocks=None, channels=None, channel_mult=None,
              dtype=jnp.float32, remat=False, num_classes=0, **modules):
  """The named size (n_blocks / channels / channel_mult override it when given);
  `modules` are UNet's block fields (conv, norm, resnet_block, attn_block)."""
  size = UNET_SIZES[name]
  return UNet(channels=channels or size.channels,
              channel_mult=tuple(channel_mult or size.channel_mult),
              n_blocks=n_blocks or size.n_blocks, gamma_min=gamma_min, gamma_max=gamma_max,
              conditioning=conditioning, dropout=dropout,
              use_fourier_features=use_fourier_features, remat=remat, num_classes=num_classes,
              dtype=dtype, **modules)
