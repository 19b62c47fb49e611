"""The default job: a tiny VAE-VDM (MVDM + TE) on scikit-learn's 8x8 digits, minutes on
2 CPU cores (recipe: `common.digits`).

Variants by argument (comma-separated key=value pairs):
  configs/digits.py                        the ELBO (beta = 1)
  configs/digits.py:remedy=free_bits       a posterior-collapse remedy (common.REMEDIES)
  configs/digits.py:classes=true           class-conditional p(x | w, y) (docs/sampling.md)
Keys:
  remedy   elbo (default) | unconditional | ue | kl_warmup | cyclical | free_bits |
           capacity | infovae | infodiffusion | high_noise | reference_beta1e4 | film | vae
  classes  true: a label embedding joins w (label dropout 0.1, so one network is also the
           unconditional model, for classifier-free guidance); the reported ELBO,
           evaluated without labels, bounds -log p(x)
"""
from configs import common

# The remedies' numbers for a 1,500-step run.
NUMBERS = dict(kl_warmup_steps=500, capacity=(100.0, 10.0, 1000), mmd_lambda=100.0)


def get_config(arg=None):
  a = common.parse_arg("configs/digits.py", arg, remedy="elbo", classes=False)
  c = common.digits(common.base_config())
  if a.classes:
    c.model.num_classes = 10
    c.model.label_dropout = 0.1
    # The label path needs several thousand steps: at 2,000 samples still ignore it.
    c.training.num_steps, c.training.checkpoint_every = 8000, 1000
  return common.apply_remedy(c, a.remedy, **NUMBERS)
