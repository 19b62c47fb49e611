"""Fashion-MNIST (60,000 train / 10,000 test, 28x28x1) on a CPU budget: study C's recipe.

Variants by argument (big_vision style), comma-separated key=value pairs:
  configs/fashion_mnist.py                           unconditional VDM (the recipe)
  configs/fashion_mnist.py:remedy=free_bits          TE encoder at beta = 1 + a remedy
  configs/fashion_mnist.py:remedy=elbo,decoder=unet  the same on the multi-resolution U-Net
Keys:
  remedy   unconditional | elbo | film | free_bits | capacity | vae (the classic VAE: the
           same encoder, a conv decoder with categorical pixels; models/conv_vae.py) |
           staged (the first quarter of the steps without the KL term, the second with
           the encoder frozen at beta = 1, then joint at beta = 1; collapse.stage_*)
  decoder  a model.vdm size: mvdm (default) | tvdm | unet | unet_s | ...
  steps    training steps (default 60000)

The recipe: AdamW lr 1e-3 (100 warm-up steps), batch 64, EMA 0.999, no dropout, a fixed
linear gamma from -13.3 to 5. The held-out ELBO on the whole 10,000-image test split every
5,000 steps (workdir/reports/step<N>.json: the learning curves) and at the end.
"""
from configs import common

REMEDIES = ("unconditional", "elbo", "film", "free_bits", "capacity", "vae", "staged")


def get_config(arg=None):
  a = common.parse_arg("configs/fashion_mnist.py", arg, remedy="unconditional",
                       decoder="mvdm", steps=60_000)
  if a.remedy not in REMEDIES:
    raise ValueError(f"configs/fashion_mnist.py: remedy={a.remedy!r}; choose one of "
                     f"{list(REMEDIES)}")
  c = common.fashion_mnist(common.base_config(), a.decoder, a.steps)
  # The capacity ramp lasts half the run.
  return common.apply_remedy(c, a.remedy, capacity=(1.0, 10.0, a.steps // 2))
