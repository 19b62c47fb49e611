"""Noise schedules gamma(t) = -log SNR(t), t in [0, 1], monotonically increasing.

Each is a flax module mapping t (scalar or [B]) to gamma of the same shape. Because the
continuous-time loss needs d gamma / dt, `gamma_and_derivative` differentiates any of
them with one forward-mode pass.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class FixedLinear(nn.Module):
  """gamma(t) = gamma_min + (gamma_max - gamma_min) t: no parameters."""
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, t):
    return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedLinear(nn.Module):
  """gamma(t) = b + |w| t with learned endpoints, initialised at gamma_min/gamma_max."""
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, t):
    b = self.param("b", nn.initializers.constant(self.gamma_min), ())
    w = self.param("w", nn.initializers.constant(self.gamma_max - self.gamma_min), ())
    return b + jnp.abs(w) * t


class _MonotoneDense(nn.Module):
  """Dense layer with non-negative weights (|kernel|), hence monotone non-decreasing."""
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = x @ jnp.abs(kernel)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


class LearnedMonotone(nn.Module):
  """The VDM learned schedule: a linear part plus a monotone MLP residual.

  gamma(t) = l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / n_features, all weights
  non-negative so gamma is non-decreasing in t; l1 starts at the linear schedule
  from gamma_min to gamma_max (Kingma et al. 2021, appendix H).
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  n_features: int = 1024

  @nn.compact
  def __call__(self, t):
    t = jnp.asarray(t, jnp.float32)
    x = t.reshape(-1, 1)
    h = _MonotoneDense(1, kernel_init=nn.initializers.constant(self.gamma_max - self.gamma_min),
                       bias_init=nn.initializers.constant(self.gamma_min), name="l1")(x)
    # l2 and l3 start small (normal, std 0.01) as in the official VDM code, so gamma
    # starts at the linear schedule plus a near-zero residual.
    small = nn.initializers.normal(stddev=0.01)
    r = _MonotoneDense(self.n_features, kernel_init=small, name="l2")(2.0 * (x - 0.5))
    r = 2.0 * (nn.sigmoid(r) - 0.5)
    r = _MonotoneDense(1, use_bias=False, kernel_init=small, name="l3")(r) / self.n_features
    return (h + r).reshape(t.shape)


SCHEDULES = {"fixed": FixedLinear, "learned_linear": LearnedLinear,
             "learned_nnet": LearnedMonotone}


def make_schedule(kind: str, gamma_min: float, gamma_max: float) -> nn.Module:
  return SCHEDULES[kind](gamma_min=gamma_min, gamma_max=gamma_max)


def gamma_and_derivative(gamma_fn, t):
  """(gamma(t), d gamma / dt) for t of shape [B] (elementwise), via one jvp."""
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
