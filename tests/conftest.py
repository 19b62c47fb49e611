"""Shared fixtures: tiny configs and paths. Tests run on CPU in seconds each."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")


def tiny_config(**overrides):
  """A digits config small enough to compile and step in seconds on 2 CPU cores."""
  from vdmrep.config_lib import base_config
  c = base_config()
  c.data.source = "digits"
  c.model.vdm = "mvdm"
  c.model.encoder = "te"
  c.model.n_blocks = 1
  c.model.channels = 8
  c.training.batch_size = 16
  c.training.num_steps = 4
  c.training.log_every = 2
  c.training.checkpoint_every = 2
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 1
  c.eval.batch_size = 64
  c.eval.num_time_samples = 1
  c.eval.max_examples = 64
  c.eval.sample_quality = False  # tested on its own (test_sample_section.py, test_cli.py)
  c.sample.num_samples = 16
  c.sample.num_steps = 8
  c.sample.num_guided = 8
  c.sample.grid_size = 16
  c.sample.classifier_steps = 20
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config
