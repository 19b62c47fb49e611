"""The VDM score network eps_hat(z_t; gamma_t, w), all at full resolution.

conv_in -> n_blocks ResNet blocks -> middle (ResNet, self-attention, ResNet) ->
n_blocks + 1 ResNet blocks, each taking the matching skip -> norm, swish ->
zero-initialised conv_out, plus z_t (so an untrained net predicts eps_hat = z_t,
the right answer at t = 1). As in Kingma et al. (2021), the net sees the normalised
gamma (gamma_t - gamma_min) / (gamma_max - gamma_min) through a sinusoidal embedding,
and optionally Fourier features of z_t.

Conditioning on the encoder latent w [B, D]:
  * "additive": w is concatenated to the time embedding before the conditioning MLP,
    so it reaches every block through the same additive projection (the study's way);
  * "film": every ResNet block scales and shifts its normalised features by a
    zero-initialised linear map of w (diffusion autoencoders' way).

A class-conditional net (num_classes > 0) also embeds a label y in [0, num_classes]
(num_classes itself is the "no label" token of classifier-free guidance, also used
when y is None); the embedding joins w on the same path (concatenated to the time
embedding, or to the FiLM input).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from vdmrep.models.layers import AttnBlock, ModuleDef, ResnetBlock, num_groups


@dataclasses.dataclass(frozen=True)
class VDMSize:
  n_blocks: int
  channels: int


VDM_SIZES = {
    "original": VDMSize(32, 128),
    "svdm": VDMSize(16, 64),
    "tvdm": VDMSize(8, 32),
    "mvdm": VDMSize(4, 16),
}

CONDITIONINGS = ("additive", "film")


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as in VDM) -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_features(z, start: int = 6, stop: int = 8):
  """sin/cos of z * 2^n * 2 pi for n in [start, stop): fine detail for likelihood."""
  freqs = 2.0 ** jnp.arange(start, stop, dtype=z.dtype) * 2.0 * jnp.pi
  h = (z[..., None] * freqs).reshape(z.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def join_label(w, y, num_classes: int, features: int, batch: int):
  """w [B, D] or None, joined with an embedding of labels y [B] ([B, D + features]).

  y None means the "no label" token num_classes. num_classes = 0 returns w unchanged.
  Called inside a compact method: the embedding is the caller's "label_embed".
  """
  if not num_classes:
    return w
  y = jnp.full((batch,), num_classes, jnp.int32) if y is None else y
  label = nn.Embed(num_classes + 1, features, name="label_embed")(y)
  return label if w is None else jnp.concatenate([w, label.astype(w.dtype)], axis=-1)


def conditioning_inputs(gamma_t, w, y, *, batch: int, channels: int, gamma_min: float,
                        gamma_max: float, conditioning: str, num_classes: int, dtype):
  """The conditioning both score networks use: (cond [B, 4 channels], film [B, D'] or None).

  gamma_t scalar or [B], normalised to [0, 1] by (gamma_min, gamma_max) and embedded
  sinusoidally; w [B, D] or None and the label y (join_label) join it ("additive") or
  become every block's FiLM input ("film"); a two-layer swish MLP gives `cond`, which
  every ResNet block adds. Called inside a compact method: "label_embed", "cond_0" and
  "cond_1" are the caller's parameters.
  """
  t = (jnp.broadcast_to(gamma_t, (batch,)) - gamma_min) / (gamma_max - gamma_min)
  cond = timestep_embedding(t, channels)
  w = join_label(w, y, num_classes, channels, batch)
  film = None
  if w is not None and conditioning == "additive":
    cond = jnp.concatenate([cond, w.astype(cond.dtype)], axis=-1)
  elif w is not None:
    film = w
  cond = nn.swish(nn.Dense(4 * channels, dtype=dtype, name="cond_0")(cond))
  cond = nn.swish(nn.Dense(4 * channels, dtype=dtype, name="cond_1")(cond))
  return cond, film


class ScoreNet(nn.Module):
  """eps_hat(z_t; gamma_t, w). The blocks are fields (flax-examples style): a backend
  passes drop-in classes with the same parameters (vdmrep/backends)."""
  n_blocks: int
  channels: int
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  conditioning: str = "additive"
  dropout: float = 0.0
  use_fourier_features: bool = True
  remat: bool = False  # recompute each ResNet block's activations in the backward pass
  num_classes: int = 0  # > 0: class-conditional (label embedding, null token num_classes)
  dtype: jnp.dtype = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.GroupNorm
  resnet_block: ModuleDef = ResnetBlock
  attn_block: ModuleDef = AttnBlock

  @nn.compact
  def __call__(self, z, gamma_t, w=None, y=None, *, deterministic: bool = True):
    """z [B, H, W, C] in model scale; gamma_t scalar or [B]; w [B, D] or None; y [B] int
    or None (ignored unless num_classes > 0) -> [B, H, W, C]."""
    c = self.channels
    cond, film = conditioning_inputs(
        gamma_t, w, y, batch=z.shape[0], channels=c, gamma_min=self.gamma_min,
        gamma_max=self.gamma_max, conditioning=self.conditioning,
        num_classes=self.num_classes, dtype=self.dtype)

    h = z
    if self.use_fourier_features:
      h = jnp.concatenate([z, fourier_features(z)], axis=-1)
    h = self.conv(c, (3, 3), dtype=self.dtype, name="conv_in")(h.astype(self.dtype))

    # Remat trades memory for a second forward pass; `deterministic` (argument 4,
    # counting self) must stay a Python bool, hence static.
    block_cls = (nn.remat(self.resnet_block, static_argnums=(4,)) if self.remat
                 else self.resnet_block)

    def block(name, h):
      out = block_cls(out_ch=c, dropout=self.dropout, zero_init_out=True, dtype=self.dtype,
                      name=name)
      return out(h, cond, film, deterministic)

    hs = [h]
    for i in range(self.n_blocks):
      h = block(f"down_{i}", h)
      hs.append(h)
    h = block("mid_block_1", h)
    h = self.attn_block(dtype=self.dtype, name="mid_attn")(h)
    h = block("mid_block_2", h)
    for i in range(self.n_blocks + 1):
      h = block(f"up_{i}", (h, hs.pop()))  # [h, skip] on channels (see ResnetBlock)
    h = nn.swish(self.norm(num_groups(c), epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
    eps_hat = self.conv(z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                        dtype=self.dtype, name="conv_out")(h)
    return z + eps_hat.astype(jnp.float32)


def make_score_net(name: str, *, gamma_min, gamma_max, conditioning, dropout,
                   use_fourier_features, n_blocks=None, channels=None, dtype=jnp.float32,
                   remat=False, num_classes=0, **modules):
  """The named size (n_blocks / channels override it when given); `modules` are
  ScoreNet's block fields (conv, norm, resnet_block, attn_block)."""
  size = VDM_SIZES[name]
  return ScoreNet(n_blocks=n_blocks or size.n_blocks, channels=channels or size.channels,
                  gamma_min=gamma_min, gamma_max=gamma_max, conditioning=conditioning,
                  dropout=dropout, use_fourier_features=use_fourier_features, remat=remat,
                  num_classes=num_classes, dtype=dtype, **modules)
