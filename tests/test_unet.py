"""The multi-resolution U-Net score network: shapes, parameter count, initialisation,
conditioning and its config option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import config_lib
from vdmrep.models import build_model
from vdmrep.models.unet import UNET_SIZES, UNet

from conftest import tiny_config


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _perturbed(params, scale=0.1, seed=3):
  """Every parameter moved, so the zero-initialised paths carry signal."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def _expected_count(c, mult, n_blocks, image_channels=1, latent=0, film=False,
                    fourier=True):
  """The U-Net's parameters counted block by block from the architecture's description
  (Ho et al. 2020 layout), independently of the module's code."""
  emb = 4 * c
  cond_in = c + (0 if film else latent)
  total = (cond_in * emb + emb) + (emb * emb + emb)                 # cond_0, cond_1
  c_in0 = image_channels * (1 + (4 if fourier else 0))              # z and 2 x 2 Fourier
  total += 9 * c_in0 * c + c                                        # conv_in

  def resnet(ci, co):
    n = 2 * ci + 9 * ci * co + co + emb * co + 2 * co + 9 * co * co + co
    if ci != co:
      n += ci * co + co                                             # 1x1 shortcut
    if film:
      n += latent * 2 * co + 2 * co
    return n

  attn = lambda ch: 2 * ch + 4 * (ch * ch + ch)
  skips, width = [c], c
  for lvl, m in enumerate(mult):
    for _ in range(n_blocks):
      total += resnet(width, c * m) + (attn(c * m) if lvl == len(mult) - 1 else 0)
      width = c * m
      skips.append(width)
    if lvl != len(mult) - 1:
      total += 9 * width * width + width                            # stride-2 conv
      skips.append(width)
  total += 2 * resnet(width, width) + attn(width)                   # middle
  for lvl in reversed(range(len(mult))):
    for _ in range(n_blocks + 1):
      total += resnet(width + skips.pop(), c * mult[lvl])
      width = c * mult[lvl]
      total += attn(width) if lvl == len(mult) - 1 else 0
    if lvl != 0:
      total += 9 * width * width + width                            # upsampling conv
  assert not skips
  return total + 2 * width + 9 * width * image_channels + image_channels  # norm, conv_out


@pytest.mark.parametrize("conditioning", ["additive", "film"])
def test_parameter_count_matches_the_architecture(conditioning):
  net = UNet(channels=8, channel_mult=(1, 2, 3), n_blocks=2, conditioning=conditioning)
  z, w = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 5))
  shapes = jax.eval_shape(net.init, jax.random.key(0), z, jnp.zeros((1,)), w)
  assert _count(shapes) == _expected_count(8, (1, 2, 3), 2, latent=5,
                                           film=conditioning == "film")


def test_named_size_at_28x28_and_its_resolutions():
  size = UNET_SIZES["unet"]
  net = UNet(channels=size.channels, channel_mult=size.channel_mult, n_blocks=size.n_blocks)
  z = jnp.zeros((1, 28, 28, 1))
  shapes = jax.eval_shape(net.init, jax.random.key(0), z, jnp.zeros((1,)))["params"]
  assert _count(shapes) == _expected_count(size.channels, size.channel_mult, size.n_blocks)
  # Two stride-2 convolutions: 28 -> 14 -> 7, attention only at 7x7 and in the middle.
  assert sorted(k for k in shapes if k.startswith(("downsample", "upsample"))) == [
      "downsample_0", "downsample_1", "upsample_1", "upsample_2"]
  assert sorted(k for k in shapes if k.endswith("attn")) == [
      "down_2_0_attn", "down_2_1_attn", "mid_attn", "up_2_0_attn", "up_2_1_attn",
      "up_2_2_attn"]
  def keep(mdl, method_name):
    return method_name == "__call__" and mdl.name in ("mid_attn", "down_0_0", "up_1_0")
  run = lambda p: net.apply({"params": p}, z, jnp.zeros((1,)), capture_intermediates=keep,
                            mutable=["intermediates"])[1]
  state = jax.eval_shape(run, shapes)  # shapes only: nothing is compiled or run
  captured = {k: v["__call__"][0].shape for k, v in state["intermediates"].items()}
  assert captured == {"down_0_0": (1, 28, 28, 32), "up_1_0": (1, 14, 14, 64),
                      "mid_attn": (1, 7, 7, 64)}


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["additive", "film"])
def test_identity_at_init_and_conditioning_reaches_the_output(conditioning):
  net = UNet(channels=8, channel_mult=(1, 2), n_blocks=1, conditioning=conditioning)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  w = jax.random.normal(jax.random.key(1), (2, 4))
  g = jnp.array([-5.0, 2.0])
  params = net.init(jax.random.key(2), z, g, w)["params"]
  # Zero-initialised last convolutions: an untrained net predicts eps_hat = z_t exactly.
  np.testing.assert_array_equal(net.apply({"params": params}, z, g, w), z)
  params = _perturbed(params)
  out = net.apply({"params": params}, z, g, w)
  assert out.shape == z.shape
  assert float(jnp.max(jnp.abs(out - net.apply({"params": params}, z, g, w + 1.0)))) > 1e-3
  assert float(jnp.max(jnp.abs(out - net.apply({"params": params}, z, g + 3.0, w)))) > 1e-3
  # Remat recomputes activations; the function is the same.
  remat = UNet(channels=8, channel_mult=(1, 2), n_blocks=1, conditioning=conditioning,
               remat=True)
  np.testing.assert_allclose(remat.apply({"params": params}, z, g, w), out, atol=1e-5)


def test_indivisible_image_is_refused():
  net = UNet(channels=8, channel_mult=(1, 2, 2), n_blocks=1)
  with pytest.raises(ValueError, match="divisible by 4"):
    net.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros((1,)))
  cfg = tiny_config(**{"model.vdm": "unet"})
  with pytest.raises(config_lib.ConfigError, match="config.model.vdm='unet'.*divisible by 4"):
    config_lib.check_image_shape(cfg, (6, 6, 1))
  config_lib.check_image_shape(cfg, (28, 28, 1))


@pytest.mark.slow
def test_config_option_builds_and_trains_through_the_elbo():
  cfg = tiny_config(**{"model.vdm": "unet_s", "model.channel_mult": (1, 2)})
  config_lib.validate(cfg)
  model = build_model(cfg.model)
  assert isinstance(model.score_net, UNet) and model.score_net.channel_mult == (1, 2)
  params = model.init(jax.random.key(0), (8, 8, 1))
  x = jax.random.randint(jax.random.key(1), (4, 8, 8, 1), 0, 256)
  loss = lambda p: jnp.mean(model.elbo_terms(p, x, jax.random.key(2), train=True).total)
  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(float(value))
  # The zero-initialised output conv gets a gradient, so training moves off the identity.
  assert float(jnp.max(jnp.abs(grads["score"]["conv_out"]["kernel"]))) > 0
  assert config_lib.model_fingerprint(cfg)["channel_mult"] == [1, 2]


def test_channel_mult_needs_a_unet():
  with pytest.raises(config_lib.ConfigError, match="config.model.channel_mult"):
    config_lib.validate(tiny_config(**{"model.vdm": "mvdm", "model.channel_mult": (1, 2)}))
  with pytest.raises(config_lib.ConfigError, match="config.model.vdm"):
    config_lib.validate(tiny_config(**{"model.vdm": "unet_xl"}))
