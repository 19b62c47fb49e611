"""Networks of the VAE-VDM and the factory that builds them from a config."""
from vdmrep.models.layers import (CONV_IMPLS, AttnBlock, ResnetBlock, default_attention_chunk,
                                  resolve_conv_impl)
from vdmrep.models.encoder import ENCODER_SIZES, Encoder, make_encoder
from vdmrep.models.schedules import SCHEDULES, make_schedule
from vdmrep.models.score_net import CONDITIONINGS, VDM_SIZES, ScoreNet, make_score_net
from vdmrep.models.unet import UNET_SIZES, UNet, make_unet
from vdmrep.models.conv_vae import VAE_DECODERS, ConvVAE
from vdmrep.models.vae_vdm import VAEVDM

import functools

import jax.numpy as jnp

# config.model.vdm: a full-resolution ScoreNet size or a multi-resolution U-Net size.
DECODER_SIZES = tuple(VDM_SIZES) + tuple(UNET_SIZES)


def build_model(model_cfg) -> VAEVDM | ConvVAE:
  """The VAE-VDM described by `config.model` (validated beforehand); with
  model.decoder = "conv_vae", the classic VAE with the same encoder."""
  dtype = jnp.bfloat16 if model_cfg.get("compute_dtype", "float32") == "bfloat16" else jnp.float32
  chunk = default_attention_chunk(model_cfg.get("attention_chunk", -1))
  conv_impl = resolve_conv_impl(model_cfg.get("conv_impl", "auto"),
                                model_cfg.get("compute_dtype", "float32"))
  if model_cfg.get("decoder", "vdm") == "conv_vae":
    return ConvVAE(encoder=make_encoder(model_cfg.encoder, dtype=dtype, attention_chunk=chunk,
                                        conv_impl=conv_impl),
                   channels=model_cfg.get("channels") or 32,
                   vocab_size=model_cfg.get("vocab_size", 256))
  num_classes = model_cfg.get("num_classes", 0)
  common = dict(gamma_min=model_cfg.gamma_min, gamma_max=model_cfg.gamma_max,
                conditioning=model_cfg.conditioning, dropout=model_cfg.dropout,
                use_fourier_features=model_cfg.fourier_features,
                n_blocks=model_cfg.get("n_blocks"), channels=model_cfg.get("channels"),
                dtype=dtype, remat=model_cfg.get("remat", False), num_classes=num_classes)
  if model_cfg.vdm in UNET_SIZES:
    # Plain flax blocks: the CPU kernels' equivalence with them is tested at ScoreNet's
    # sizes, not at the U-Net's 14x14 and 7x7 levels.
    score = make_unet(model_cfg.vdm, channel_mult=model_cfg.get("channel_mult") or None,
                      resnet_block=functools.partial(ResnetBlock, conv_impl="xla"),
                      attn_block=functools.partial(AttnBlock, batch_chunk=chunk), **common)
  else:
    score = make_score_net(model_cfg.vdm, attention_chunk=chunk, conv_impl=conv_impl,
                           **common)
  return VAEVDM(
      score_net=score,
      schedule=make_schedule(model_cfg.gamma_type, model_cfg.gamma_min, model_cfg.gamma_max),
      encoder=make_encoder(model_cfg.encoder, dtype=dtype, attention_chunk=chunk,
                           conv_impl=conv_impl,
                           num_classes=num_classes if model_cfg.get("label_encoder") else 0),
      num_classes=num_classes, label_dropout=model_cfg.get("label_dropout", 0.0),
      vocab_size=model_cfg.get("vocab_size", 256),
      antithetic_time_sampling=model_cfg.get("antithetic_time_sampling", True))
