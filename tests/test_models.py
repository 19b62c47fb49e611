"""Networks: parameter counts, shapes, initialisation and the gamma schedules."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep.models import build_model, make_encoder, make_schedule
from vdmrep.models.schedules import gamma_and_derivative
from vdmrep.models.score_net import ScoreNet

from conftest import tiny_config


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,expected", [("oepp", 716_481), ("oe", 515_521),
                                           ("se", 261_793), ("te", 216_529),
                                           ("ue", 515_521)])
def test_encoder_parameter_counts_match_the_study(name, expected):
  shapes = jax.eval_shape(make_encoder(name).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert _count(shapes) == expected


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("conditioning", ["additive", "film"])
def test_shapes_and_identity_initialisation(channels, conditioning):
  cfg = tiny_config(**{"model.conditioning": conditioning}).model
  model = build_model(cfg)
  params = model.init(jax.random.key(0), (8, 8, channels))
  x = jax.random.randint(jax.random.key(1), (3, 8, 8, channels), 0, 256)
  mean, logvar = model.encode(params, x)
  assert mean.shape == logvar.shape == (3, model.encoder.latent)
  z = jax.random.normal(jax.random.key(2), (3, 8, 8, channels))
  eps_hat = model.eps_hat(params, z, jnp.zeros((3,)), mean)
  assert eps_hat.shape == z.shape
  # Zero-initialised output conv: an untrained net predicts eps_hat = z_t.
  np.testing.assert_allclose(eps_hat, z, atol=1e-6)
  terms = model.elbo_terms(params, x, jax.random.key(3), train=True)
  for k, v in terms.bound_terms().items():
    assert v.shape == (3,) and bool(jnp.all(jnp.isfinite(v))), k


@pytest.mark.slow
def test_latent_reaches_the_score_net_in_both_conditionings():
  for conditioning in ("additive", "film"):
    net = ScoreNet(n_blocks=1, channels=8, conditioning=conditioning)
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    w = jax.random.normal(jax.random.key(1), (2, 4))
    params = net.init(jax.random.key(2), z, jnp.zeros((2,)), w)["params"]
    # Perturb every parameter so the zero-initialised paths carry signal.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    out1 = net.apply({"params": params}, z, jnp.zeros((2,)), w)
    out2 = net.apply({"params": params}, z, jnp.zeros((2,)), w + 1.0)
    assert float(jnp.max(jnp.abs(out1 - out2))) > 1e-3, conditioning


@pytest.mark.parametrize("kind", ["fixed", "learned_linear", "learned_nnet"])
def test_schedules_monotone_with_endpoints_and_derivative(kind):
  sched = make_schedule(kind, -13.3, 5.0)
  params = sched.init(jax.random.key(0), jnp.zeros(())).get("params", {})
  fn = lambda t: sched.apply({"params": params}, t)
  t = jnp.linspace(0.0, 1.0, 101)
  g = fn(t)
  assert bool(jnp.all(jnp.diff(g) > 0))
  if kind != "learned_nnet":  # the nnet adds a bounded monotone residual to the line
    np.testing.assert_allclose([g[0], g[-1]], [-13.3, 5.0], rtol=1e-6)
  _, dg = gamma_and_derivative(fn, t[1:-1])
  h = 1e-3
  fd = (fn(t[1:-1] + h) - fn(t[1:-1] - h)) / (2 * h)
  np.testing.assert_allclose(dg, fd, rtol=2e-2)


def test_antithetic_times_are_evenly_spaced_and_uniform():
  model = build_model(tiny_config().model)
  t = np.sort(np.asarray(model.sample_t(jax.random.key(0), 8)))
  np.testing.assert_allclose(np.diff(t), 1.0 / 8, atol=1e-6)
  assert 0.0 <= t[0] < 1.0 / 8


def _tree(model, shape):
  shapes = jax.eval_shape(lambda k: model.init(k, shape), jax.random.key(0))
  return sorted([jax.tree_util.keystr(p), list(l.shape)]
                for p, l in jax.tree_util.tree_leaves_with_path(shapes))


def test_parameter_trees_are_the_recorded_ones():
  """Parameter names and shapes of TVDM + TE (28x28) and a tiny FiLM model equal the ones
  recorded in param_trees.json: checkpoints written by earlier versions keep loading."""
  with open(os.path.join(os.path.dirname(__file__), "param_trees.json")) as f:
    recorded = json.load(f)
  c = tiny_config()
  c.model.vdm, c.model.n_blocks, c.model.channels = "tvdm", 0, 0
  assert _tree(build_model(c.model), (28, 28, 1)) == recorded["tvdm_te_28x28x1"]
  c = tiny_config(**{"model.conditioning": "film"})
  assert _tree(build_model(c.model), (8, 8, 1)) == recorded["tiny_film_8x8x1"]


def test_importing_the_models_loads_no_kernel():
  """The model is plain flax: importing it (and building one) loads no backend module."""
  code = ("import sys; import vdmrep.models as m; from vdmrep import config_lib; "
          "m.build_model(config_lib.base_config().model); "
          "print(sorted(n for n in sys.modules if n.startswith('vdmrep.backends')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"
