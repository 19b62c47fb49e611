"""Noise schedules gamma(t) = -log SNR(t), t in [0, 1], monotonically increasing.

The scalar schedules are flax modules mapping t (scalar or [B]) to gamma of the same
shape. `PerPixel` is the latent-driven schedule gamma(t, w) of MuLAN (Sahoo et al. 2024):
one monotone curve per pixel, its shape set by the latent w. Because the continuous-time
loss needs d gamma / dt, `gamma_and_derivative` differentiates any of them with one
forward-mode pass.
"""
from __future__ import annotations

import math

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
PER_PIXEL = ("per_pixel", "per_pixel_learned_endpoints")  # gamma(t, w): conditional only


def make_schedule(kind: str, gamma_min: float, gamma_max: float,
                  image_shape=None) -> nn.Module:
  if kind in PER_PIXEL:
    return PerPixel(tuple(image_shape), gamma_min=gamma_min, gamma_max=gamma_max,
                    learned_endpoints=kind == "per_pixel_learned_endpoints")
  return SCHEDULES[kind](gamma_min=gamma_min, gamma_max=gamma_max)


class PerPixel(nn.Module):
  """gamma(t, w) per pixel: gamma_min + (gamma_max - gamma_min) p(t; w), monotone in t.

  p(t; w) = sum_j a_j t^j / sum_j a_j (j = 1..degree) with a_j = c_j(w)^2 >= 0 per pixel,
  so p(0) = 0, p(1) = 1 and p is non-decreasing: the endpoints are gamma_min and gamma_max
  for every pixel (or, with `learned_endpoints`, per-pixel offsets of them, functions of w).
  c(w) is a Dense map of w, zero-initialised with c_1 = 1 and c_j = 0 otherwise, so the
  schedule starts w-independent and equal to `FixedLinear`.

  __call__(t, w): t [B] (or scalar), w [B, D] -> gamma [B, *image_shape].
  """
  image_shape: tuple
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  degree: int = 3
  learned_endpoints: bool = False

  @nn.compact
  def __call__(self, t, w):
    n = math.prod(self.image_shape)
    b = w.shape[0]
    init = jnp.zeros((self.degree, n)).at[0].set(1.0).reshape(-1)
    c = nn.Dense(self.degree * n, kernel_init=nn.initializers.zeros,
                 bias_init=lambda *_: init, name="coefficients")(w)
    a = jnp.square(c.reshape(b, self.degree, n)) + 1e-8  # a_j >= 0; no 0/0 when all vanish
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    powers = t[:, None] ** jnp.arange(1, self.degree + 1, dtype=jnp.float32)[None]  # [B, J]
    p = jnp.einsum("bj,bjn->bn", powers, a) / jnp.sum(a, axis=1)
    lo, hi = jnp.full((b, n), self.gamma_min), jnp.full((b, n), self.gamma_max)
    if self.learned_endpoints:
      shift = nn.Dense(2 * n, kernel_init=nn.initializers.zeros, name="endpoints")(w)
      d_lo, d_hi = jnp.split(shift, 2, axis=-1)
      lo = lo + d_lo
      hi = lo + (self.gamma_max - self.gamma_min) * jnp.exp(d_hi)  # keeps hi > lo
    return (lo + (hi - lo) * p).reshape((b,) + tuple(self.image_shape))


def gamma_and_derivative(gamma_fn, t):
  """(gamma(t), d gamma / dt) for t of shape [B] (elementwise), via one jvp."""
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
