"""Backends: who computes the model's blocks. `config.model.backend` picks one.

  xla   the plain flax blocks of vdmrep.models (any device; the reference).
  cpu   fused C++ kernels for a single-device float32 CPU program (vdmrep.backends.cpu),
        same parameters and mathematics; needs its kernels built beforehand.
  auto  cpu where it can run, else xla.

Where "cpu" cannot run, one line on stderr says why and the model runs on XLA ("auto"
says so too when the kernels' library is refused; when they are only not built, or the
program is not one they serve, "auto" logs it at INFO, shown with `--verbose`): the
choice changes speed, never the parameters. With VDMREP_REQUIRE_CPU_KERNELS=1 a program
the kernels could serve stops instead (ConfigError) when they cannot be loaded (not
built, failed build, unsafe or unverified library).
"""
from __future__ import annotations

import functools
import os
import sys

import jax
from absl import logging

from vdmrep import models
from vdmrep.models import layers
from vdmrep.config_lib import BACKENDS, ConfigError


def _program_reason(compute_dtype: str) -> str | None:
  """Why this program is not one the CPU kernels serve (one line), or None."""
  if jax.default_backend() != "cpu":
    return f"the JAX backend is {jax.default_backend()}, not cpu"
  if compute_dtype != "float32":
    return f"compute_dtype={compute_dtype!r} (the kernels are float32)"
  if jax.device_count() > 1:
    return f"{jax.device_count()} devices (a custom call is not partitioned across devices)"
  return None


def _kernels_reason() -> str | None:
  from vdmrep.backends.cpu import kernels  # noqa: the optional backend, loaded on demand
  return kernels.unavailable_reason()


def cpu_unavailable_reason(compute_dtype: str = "float32") -> str | None:
  """None when the CPU backend can run this program, else why not (one line)."""
  return _program_reason(compute_dtype) or _kernels_reason()


@functools.cache
def _note(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def resolve(model_cfg) -> str:
  """config.model -> "xla" or "cpu" (printing the one-line note when it falls back)."""
  setting = model_cfg.get("backend", "auto")
  if setting not in BACKENDS:
    raise ValueError(f"model.backend={setting!r}: expected one of {BACKENDS}")
  if setting == "xla":
    return "xla"
  reason = _program_reason(model_cfg.get("compute_dtype", "float32"))
  if reason is None:
    reason = _kernels_reason()
    if reason is None:
      return "cpu"
    if os.environ.get("VDMREP_REQUIRE_CPU_KERNELS") == "1":
      raise ConfigError(f"model.backend={setting}: the CPU kernels cannot be loaded "
                        f"({reason}) and VDMREP_REQUIRE_CPU_KERNELS=1 forbids falling back "
                        "to XLA")
  if setting == "cpu" or (jax.default_backend() == "cpu" and "refusing" in reason):
    _note(f"model.backend={setting}: using XLA ({reason})")
  elif jax.default_backend() == "cpu":  # a notice, shown with --verbose
    logging.info("model.backend=auto: using XLA (%s)", reason)
  return "xla"


def modules(backend: str) -> dict:
  """The block fields (conv, norm, resnet_block, attn_block) for a resolved backend."""
  if backend == "xla":
    return {}
  from vdmrep.backends.cpu import layers  # noqa: the optional backend, loaded on demand
  return layers.modules()


def build_model(model_cfg, image_shape=None):
  """`vdmrep.models.build_model` with the blocks of the backend `config.model` selects
  (`image_shape` (H, W, C): for the per-pixel schedule and the VampPrior)."""
  return models.build_model(model_cfg, image_shape, **modules(resolve(model_cfg)))


def name(model) -> str:
  """"cpu" or "xla": which backend's blocks `model` was built with."""
  net = model.score_net if model.score_net is not None else model.encoder
  return "xla" if net is None or net.resnet_block is layers.ResnetBlock else "cpu"
