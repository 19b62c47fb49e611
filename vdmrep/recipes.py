"""Shared training recipes that `configs/*.py` apply to `config_lib.base_config()`.

Config files are loaded by path, so they cannot import each other; the settings several
of them share live here. Each function edits the ConfigDict in place and returns it.
"""
from __future__ import annotations

# The real MNIST test split, offline; relative to the repository root (run from there).
MNIST_SOURCE = "idx:../shared/data/mnist"


def study(c):
  """The reference study's recipe (its published VDM training code).

  100k steps, batch 64, AdamW (lr 2e-4, betas (0.9, 0.99), weight decay 0.01), gradient
  clipping at global norm 1.0, EMA decay up to 0.9999, a fixed linear gamma from -13.3
  to 5, dropout 0.1 in the score network. EMA: the warm-up form min(0.9999, (1+s)/(10+s))
  (0.999 after 8,990 steps, 0.9999 after ~90k); the official code's constant 0.9999 is
  `optim.ema_schedule = 'constant'`. The KL weight is *not* set here (see the *_reference_beta1e4
  configs for the study's beta = 1e4).
  """
  c.training.num_steps = 100_000
  c.training.batch_size = 64
  c.optim.lr = 2e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.99
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.optim.ema_schedule = "warmup"
  c.model.gamma_type = "fixed"
  c.model.gamma_min, c.model.gamma_max = -13.3, 5.0
  c.model.dropout = 0.1
  return c


def mnist(c, source: str = MNIST_SOURCE):
  """The study's recipe on MNIST (28x28x1), TVDM + TE, as `configs/mnist.py`.

  `source` defaults to the offline idx files (only the test split: split train/eval by
  `data.split_seed`); `--config.data.source=tfds:mnist` gives the standard splits.
  """
  study(c)
  c.data.source = source
  c.model.vdm, c.model.encoder = "tvdm", "te"
  c.training.log_every = 500
  c.training.checkpoint_every = 5_000
  c.training.eval_every = 10_000
  c.eval.num_time_samples = 4
  return c


def digits(c):
  """The CPU-sized job on scikit-learn's 8x8 digits (the settings of `configs/digits.py`).

  The study's 100k steps at lr 2e-4 are far more than 1,797 tiny images need; this keeps
  its batch size, AdamW betas, weight decay, clipping and gamma, with a shorter run.
  EMA: the warm-up form min(0.999, (1+s)/(10+s)) (0.99 at step 890, 0.999 never within
  1,500 steps: it ends at 0.994).
  """
  c.data.source = "digits"
  c.model.vdm = "mvdm"
  c.model.encoder = "te"
  c.training.batch_size = 64
  c.training.num_steps = 1500
  c.training.log_every = 100
  c.training.checkpoint_every = 500
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.999
  c.optim.ema_schedule = "warmup"
  c.eval.num_time_samples = 4
  # Sample quality on a CPU budget (the base config's default is 10,000 samples x 1000
  # steps, ~100x the compute); the report records both numbers next to the FD.
  c.sample.num_samples = 500
  c.sample.num_steps = 100
  c.sample.batch_size = 500
  return c
