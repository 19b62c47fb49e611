"""Networks of the VAE-VDM and the factory that builds them from a config."""
from vdmrep.models.encoder import ENCODER_SIZES, Encoder, make_encoder
from vdmrep.models.schedules import SCHEDULES, make_schedule
from vdmrep.models.score_net import CONDITIONINGS, VDM_SIZES, ScoreNet, make_score_net
from vdmrep.models.unet import UNET_SIZES, UNet, make_unet
from vdmrep.models.conv_vae import VAE_DECODERS, ConvVAE
from vdmrep.models.vae_vdm import VAEVDM

import jax.numpy as jnp

# config.model.vdm: a full-resolution ScoreNet size or a multi-resolution U-Net size.
DECODER_SIZES = tuple(VDM_SIZES) + tuple(UNET_SIZES)


def build_model(model_cfg, **modules) -> VAEVDM | ConvVAE:
  """The VAE-VDM described by `config.model` (validated beforehand); with
  model.decoder = "conv_vae", the classic VAE with the same encoder.

  `modules` (conv, norm, resnet_block, attn_block) replace the plain flax blocks of the
  encoder and score network with drop-ins of the same parameters; `vdmrep.backends`
  picks them from `config.model.backend`.
  """
  dtype = jnp.bfloat16 if model_cfg.get("compute_dtype", "float32") == "bfloat16" else jnp.float32
  if model_cfg.get("decoder", "vdm") == "conv_vae":
    return ConvVAE(encoder=make_encoder(model_cfg.encoder, dtype=dtype, **modules),
                   channels=model_cfg.get("channels") or 32,
                   vocab_size=model_cfg.get("vocab_size", 256))
  num_classes = model_cfg.get("num_classes", 0)
  common = dict(gamma_min=model_cfg.gamma_min, gamma_max=model_cfg.gamma_max,
                conditioning=model_cfg.conditioning, dropout=model_cfg.dropout,
                use_fourier_features=model_cfg.fourier_features,
                n_blocks=model_cfg.get("n_blocks"), channels=model_cfg.get("channels"),
                dtype=dtype, remat=model_cfg.get("remat", False), num_classes=num_classes,
                **modules)
  if model_cfg.vdm in UNET_SIZES:
    # Plain flax blocks whatever the backend: the CPU kernels' equivalence with them is
    # tested at ScoreNet's sizes, not at the U-Net's lower-resolution levels.
    plain = {k: v for k, v in common.items() if k not in modules}
    score = make_unet(model_cfg.vdm, channel_mult=model_cfg.get("channel_mult") or None,
                      **plain)
  else:
    score = make_score_net(model_cfg.vdm, **common)
  return VAEVDM(
      score_net=score,
      schedule=make_schedule(model_cfg.gamma_type, model_cfg.gamma_min, model_cfg.gamma_max),
      encoder=make_encoder(model_cfg.encoder, dtype=dtype,
                           num_classes=num_classes if model_cfg.get("label_encoder") else 0,
                           **modules),
      num_classes=num_classes, label_dropout=model_cfg.get("label_dropout", 0.0),
      vocab_size=model_cfg.get("vocab_size", 256),
      antithetic_time_sampling=model_cfg.get("antithetic_time_sampling", True))
