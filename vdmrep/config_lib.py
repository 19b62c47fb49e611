"""The base experiment config and its validation (run before anything compiles).

`configs/*.py` start from `base_config()` and override a few fields, so each file
reads like one row of an experiment table. `validate` names the offending key.
"""
from __future__ import annotations

import ml_collections

from vdmrep.models.encoder import ENCODER_SIZES
from vdmrep.models.schedules import SCHEDULES
from vdmrep.models.score_net import CONDITIONINGS, VDM_SIZES

DATA_SOURCES = ("digits", "tfds:", "idx:", "npz:")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"          # digits | tfds:<name> | idx:<dir> | npz:<file>
  c.data.eval_fraction = 0.15       # held out when a source has no test split
  c.data.split_seed = 0             # fixed train/eval split of such sources
  c.data.tfds_data_dir = ""         # "" = tfds default
  c.data.max_train_examples = 0     # 0 = all; > 0 keeps the first N (small studies)

  c.model = ml_collections.ConfigDict()
  c.model.vdm = "tvdm"              # original | svdm | tvdm | mvdm
  c.model.encoder = "te"            # oepp | oe | se | te | ue (no KL) | none (unconditional)
  c.model.conditioning = "additive"  # additive | film
  c.model.gamma_type = "fixed"      # fixed | learned_linear | learned_nnet
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.fourier_features = True
  c.model.dropout = 0.0
  c.model.n_blocks = 0              # 0 = the size's default
  c.model.channels = 0              # 0 = the size's default
  c.model.antithetic_time_sampling = True
  c.model.vocab_size = 256
  c.model.compute_dtype = "float32"  # float32 | bfloat16 (params and loss stay f32)
  c.model.remat = False             # recompute score-net block activations (less memory)
  c.model.attention_chunk = -1      # examples per attention chunk; -1 auto (1 on CPU), 0 all

  c.collapse = ml_collections.ConfigDict()
  c.collapse.schedule = "constant"  # the KL weight beta(step); see vdmrep/collapse.py
  c.collapse.beta = 1.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 64        # global, over all devices and hosts
  c.training.num_steps = 1000
  c.training.log_every = 50
  c.training.checkpoint_every = 500
  c.training.keep_checkpoints = 3
  c.training.eval_every = 0         # 0 = only at the end

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.num_time_samples = 4       # K Monte Carlo draws of (t, eps, w) per image
  c.eval.max_examples = 0           # 0 = the whole eval split

  c.distributed = ml_collections.ConfigDict()  # see docs/distributed.md
  c.distributed.initialize = False  # call jax.distributed.initialize() (multi-process runs)
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = env / auto-detect
  c.distributed.num_processes = 0   # 0 = env JAX_NUM_PROCESSES / auto-detect
  c.distributed.process_id = -1     # -1 = env JAX_PROCESS_ID / auto-detect
  c.distributed.cluster_detection_method = ""  # "" = JAX tries SLURM, Open MPI, TPU, ...
  c.distributed.initialization_timeout = 300  # seconds to wait for all processes
  return c


def _choice(cfg, key, value, options):
  if value not in options:
    raise ConfigError(f"config.{key}={value!r} is not valid; choose one of {list(options)}")


def _positive(key, value, allow_zero=False):
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    raise ConfigError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(config, num_devices: int = 1, num_processes: int = 1) -> None:
  """Raises ConfigError naming the first bad key; returns None if the config can run."""
  m, t, o, e = config.model, config.training, config.optim, config.eval
  _choice(config, "model.vdm", m.vdm, VDM_SIZES)
  _choice(config, "model.encoder", m.encoder, tuple(ENCODER_SIZES) + ("none",))
  _choice(config, "model.conditioning", m.conditioning, CONDITIONINGS)
  _choice(config, "model.gamma_type", m.gamma_type, SCHEDULES)
  _choice(config, "model.compute_dtype", m.compute_dtype, ("float32", "bfloat16"))
  if not m.gamma_min < m.gamma_max:
    raise ConfigError(f"config.model.gamma_min={m.gamma_min} must be < "
                      f"config.model.gamma_max={m.gamma_max}")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"config.model.dropout={m.dropout} must be in [0, 1)")
  _positive("model.n_blocks", m.n_blocks, allow_zero=True)
  _positive("model.channels", m.channels, allow_zero=True)
  if m.channels and m.channels % 4:
    raise ConfigError(f"config.model.channels={m.channels} must be a multiple of 4 (GroupNorm)")
  _positive("model.vocab_size", m.vocab_size)
  if m.attention_chunk < -1:
    raise ConfigError(f"config.model.attention_chunk={m.attention_chunk} must be -1 (auto), "
                      "0 (whole batch) or a positive number of examples")
  src = config.data.source
  if not (src == "digits" or any(src.startswith(p) and len(src) > len(p)
                                 for p in DATA_SOURCES[1:])):
    raise ConfigError(f"config.data.source={src!r} is not valid; use 'digits', "
                      "'tfds:<name>', 'idx:<dir>' or 'npz:<file>'")
  if not 0.0 < config.data.eval_fraction < 1.0:
    raise ConfigError(f"config.data.eval_fraction={config.data.eval_fraction} must be in (0, 1)")
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive(f"training.{key}", t[key])
  _positive("training.eval_every", t.eval_every, allow_zero=True)
  if t.batch_size % num_devices:
    raise ConfigError(f"config.training.batch_size={t.batch_size} is not divisible by the "
                      f"{num_devices} devices it is sharded over")
  _positive("eval.batch_size", e.batch_size)
  if e.batch_size % num_devices:
    raise ConfigError(f"config.eval.batch_size={e.batch_size} is not divisible by the "
                      f"{num_devices} devices it is sharded over")
  for key, size in (("training.batch_size", t.batch_size), ("eval.batch_size", e.batch_size)):
    if size % num_processes:  # each process reads an equal slice of the global batch
      raise ConfigError(f"config.{key}={size} is not divisible by the {num_processes} "
                        "processes that each read an equal slice of it")
  _positive("eval.num_time_samples", e.num_time_samples)
  _positive("optim.lr", o.lr)
  _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
  _positive("optim.grad_clip", o.grad_clip)
  if not 0.0 <= o.ema_decay < 1.0:
    raise ConfigError(f"config.optim.ema_decay={o.ema_decay} must be in [0, 1)")
  for key in ("b1", "b2"):
    if not 0.0 <= o[key] < 1.0:
      raise ConfigError(f"config.optim.{key}={o[key]} must be in [0, 1)")
  from vdmrep import collapse  # late import: collapse reads config names from here
  collapse.validate(config)
  from vdmrep import parallel  # late import: parallel raises this module's ConfigError
  parallel.validate(config)


def model_fingerprint(config) -> dict:
  """The config fields that fix the parameter shapes (checked when resuming)."""
  m = config.model
  return {k: m[k] for k in ("vdm", "encoder", "conditioning", "gamma_type", "fourier_features",
                            "n_blocks", "channels", "vocab_size")}
