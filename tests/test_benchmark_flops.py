"""The FLOP count the benchmarks use on accelerators (a CPU-only subprocess) is the
in-process count of the same loop-free train step: MFU on a GPU rests on it."""
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import common, train_step
from vdmrep import parallel
from vdmrep import train as train_lib
from vdmrep.models import build_model


def _in_process(vdm, encoder, batch, image):
  config = train_step.make_config(vdm, encoder, batch)
  model = build_model(config.model)
  tx = train_lib.make_optimizer(config.optim)
  mesh = parallel.make_mesh()
  state = train_lib.initial_state(model, tx, config, (image, image, 1), mesh)
  x = parallel.global_batch(mesh, np.zeros((batch, image, image, 1), np.uint8))
  return train_step._model_flops(vdm, encoder, batch, "float32", state, x,
                                 jax.random.key(0))


@pytest.mark.slow
def test_flops_on_cpu_subprocess_equals_in_process_count():
  here = _in_process("mvdm", "te", 2, 8)
  there = common.flops_on_cpu("benchmarks.train_step", [
      "--count-flops", "--vdm=mvdm", "--encoder=te", "--batch=2", "--image=8",
      "--channels=1", "--dtype=float32"])
  assert here > 1e6  # a real count, not nan or zero
  assert there == here
  # Twice the batch, nearly twice the FLOPs (the optimiser's share does not grow).
  assert 1.8 * here < _in_process("mvdm", "te", 4, 8) < 2.0 * here


def test_lowered_flops_is_nan_where_the_backend_cannot_count():
  class Unanalysable:  # what jax 0.11's CUDA plugin gives: None, or an exception
    def __init__(self, result):
      self.result = result

    def cost_analysis(self):
      if isinstance(self.result, Exception):
        raise self.result
      return self.result

  assert np.isnan(common.lowered_flops(Unanalysable(None)))
  assert np.isnan(common.lowered_flops(Unanalysable(NotImplementedError("plugin"))))
  assert common.lowered_flops(Unanalysable([{"flops": 12.0}])) == 12.0

