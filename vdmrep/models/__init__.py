"""Networks of the VAE-VDM and the factory that builds them from a config."""
from vdmrep.models.encoder import ENCODER_SIZES, Encoder, make_encoder
from vdmrep.models.priors import CATEGORICAL_PRIORS, PRIORS, make_prior
from vdmrep.models.schedules import PER_PIXEL, SCHEDULES, make_schedule
from vdmrep.models.score_net import CONDITIONINGS, VDM_SIZES, ScoreNet, make_score_net
from vdmrep.models.unet import UNET_SIZES, UNet, make_unet
from vdmrep.models.conv_vae import VAE_DECODERS, ConvVAE
from vdmrep.models.vae_vdm import BOUND_TERMS, VAEVDM, ELBOTerms

import jax.numpy as jnp

# config.model.vdm: a full-resolution ScoreNet size or a multi-resolution U-Net size.
DECODER_SIZES = tuple(VDM_SIZES) + tuple(UNET_SIZES)


def build_model(model_cfg, image_shape=None, **modules) -> VAEVDM | ConvVAE:
  """The VAE-VDM described by `config.model` (validated beforehand); with
  model.decoder = "conv_vae", the classic VAE with the same encoder.

  `image_shape` (H, W, C) is needed by the per-pixel schedule and the VampPrior (whose
  pseudo-inputs are images). `modules` (conv, norm, resnet_block, attn_block) replace the
  plain flax blocks of the encoder and score network with drop-ins of the same
  parameters; `vdmrep.backends` picks them from `config.model.backend`.
  """
  dtype = jnp.bfloat16 if model_cfg.get("compute_dtype", "float32") == "bfloat16" else jnp.float32
  categorical = model_cfg.get("latent", "gaussian") == "categorical"
  k = model_cfg.get("latent_categories", 0) if categorical else 0
  latent = model_cfg.get("latent_dim", 0) * (k if categorical else 1)  # categorical: M K
  if model_cfg.get("decoder", "vdm") == "conv_vae":
    return ConvVAE(encoder=make_encoder(model_cfg.encoder, dtype=dtype, latent=latent,
                                        **modules),
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
  needs_shape = (model_cfg.gamma_type in PER_PIXEL or model_cfg.get("prior") == "vamp")
  if needs_shape and image_shape is None:
    raise ValueError("build_model: this config (per-pixel schedule or VampPrior) needs "
                     "image_shape")
  encoder = make_encoder(model_cfg.encoder, dtype=dtype, latent=latent,
                         num_classes=num_classes if model_cfg.get("label_encoder") else 0,
                         **modules)
  prior = None
  if encoder is not None:
    prior = make_prior(model_cfg.get("prior", "standard"), encoder.latent,
                       components=model_cfg.get("prior_components", 16),
                       image_shape=image_shape, categories=k,
                       flow_layers=model_cfg.get("prior_flow_layers", 4),
                       hidden=model_cfg.get("prior_hidden", 128))
  return VAEVDM(
      score_net=score,
      schedule=make_schedule(model_cfg.gamma_type, model_cfg.gamma_min, model_cfg.gamma_max,
                             image_shape),
      encoder=encoder,
      num_classes=num_classes, label_dropout=model_cfg.get("label_dropout", 0.0),
      vocab_size=model_cfg.get("vocab_size", 256),
      antithetic_time_sampling=model_cfg.get("antithetic_time_sampling", True),
      prior=prior, latent_kind=model_cfg.get("latent", "gaussian"), categories=k,
      posterior_std_max=model_cfg.get("posterior_std_max", 0.0),
      relaxation_temperature=model_cfg.get("relaxation_temperature", 1.0))
