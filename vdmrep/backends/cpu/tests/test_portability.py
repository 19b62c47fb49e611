"""A checkpoint written with one backend restores under the other and gives the same
held-out ELBO: the CPU blocks are drop-ins with the plain flax blocks' parameters."""
import jax
import numpy as np
import pytest

from vdmrep import backends, checkpoints, config_lib, data, parallel
from vdmrep.evaluators import elbo as elbo_evaluator
from vdmrep.backends.cpu import kernels

_REASON = kernels.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernels: {_REASON}")


def _model(backend):
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder, c.model.n_blocks, c.model.channels = "mvdm", "te", 1, 16
  c.model.backend = backend
  model = backends.build_model(c.model)
  assert backends.name(model) == backend
  return c, model


@pytest.mark.slow
def test_checkpoint_moves_between_backends_with_the_same_eval_loss(tmp_path):
  images = data.load(config_lib.base_config().data).eval_images[:64]
  mesh = parallel.make_mesh()
  elbo = lambda model, params: elbo_evaluator.evaluate_elbo(
      model, params, images, seed=0, num_samples=1, batch_size=64, mesh=mesh)["bpd"]
  for write, read in (("cpu", "xla"), ("xla", "cpu")):
    c, writer = _model(write)
    params = writer.init(jax.random.key(0), (8, 8, 1))
    # Move away from the zero-initialised output layers so every block matters.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          params)
    fp, meta = config_lib.model_fingerprint(c), {"step": 1, "image_shape": [8, 8, 1]}
    meta["model_fingerprint"] = fp
    ckpt = checkpoints.Checkpoints(str(tmp_path / write), keep=1)
    ckpt.save(1, params, meta)
    _, reader = _model(read)
    template = jax.eval_shape(lambda k: reader.init(k, (8, 8, 1)), jax.random.key(0))
    restored = checkpoints.Checkpoints(str(tmp_path / write), keep=1).restore(
        1, checkpoints.abstract(template))
    for u, v in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
      np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(elbo(reader, restored), elbo(writer, params), rtol=1e-5)
