"""Shared fixtures: tiny configs and paths. Tests run on CPU in seconds each."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")
# The tests compile the same tiny programs many times, here and in the training processes
# they launch: XLA's persistent cache (keyed by the program, the compiler and its flags)
# compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# And they compile far more than they run: LLVM without its optimisation passes takes about
# a third less CPU over a test (same HLO and fusions; the tests compare like with like).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# Probes of a tiny model: 256 training images and two C values instead of up to 10,000
# images and six (the probes' own tests use the full settings).
TINY_PROBES = {"probe_max_train": 256, "probe_cs": "0.1,10", "probe_cv_folds": 2}
TINY_PROBE_FLAGS = [f"--config.eval.{k}={v}" for k, v in TINY_PROBES.items()]


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
  c.eval.update(TINY_PROBES)
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
