"""End-to-end (tiny model, 8x8 digits, in-process): SIGTERM saves and exits, a resumed
run is bitwise the uninterrupted one, non-finite steps stop or are skipped."""
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vdmrep import checkpoints, config_lib, parallel, reliability, train
from vdmrep.models.vae_vdm import VAEVDM

from benchmarks import chaos  # read_scalars, final_state

STEPS = 12
pytestmark = pytest.mark.slow  # five tiny in-process trainings (each compiles its step)


def tiny(**training):
  c = config_lib.base_config()
  c.model.vdm, c.model.n_blocks, c.model.channels = "mvdm", 1, 8
  c.training.update(batch_size=8, num_steps=STEPS, log_every=5, checkpoint_every=5, **training)
  c.eval.update(max_examples=16, batch_size=16, num_time_samples=1, sample_quality=False,
                evaluators="elbo,baselines,latents")
  c.optim.warmup_steps = 2
  return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: (workdir, eval summary)."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  return workdir, train.train_and_evaluate(tiny(), workdir)


def signal_at(monkeypatch, step, signum=signal.SIGTERM):
  """Sends `signum` to this process as the loop (main thread) places the batch of `step`.

  Batches are built ahead in a prefetch thread, so the hook sits on `global_batch`, the
  one per-step call the loop makes itself; the run starts at step 0, so call k is step k.
  """
  real, calls = parallel.global_batch, [0]

  def place(mesh, local):
    if calls[0] == step:
      os.kill(os.getpid(), signum)
    calls[0] += 1
    return real(mesh, local)

  monkeypatch.setattr(parallel, "global_batch", place)


def test_sigterm_saves_then_resume_is_bitwise_exact(reference, tmp_path, monkeypatch):
  ref_dir, ref_summary = reference
  workdir = str(tmp_path)
  signal_at(monkeypatch, 6)
  with pytest.raises(reliability.Interrupted) as err:
    train.train_and_evaluate(tiny(), workdir)
  # Step 6 finishes, then a checkpoint at 7 (not a checkpoint_every multiple) and exit.
  assert err.value.step == 7 and reliability.exit_code(err.value) == 143
  assert chaos.steps_on_disk(workdir)[0] == [5, 7]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed
  monkeypatch.undo()
  summary = train.train_and_evaluate(tiny(), workdir)
  assert summary == ref_summary  # eval of the EMA params: exact floats
  ref_step, ref_leaves, ref_meta = chaos.final_state(ref_dir)
  step, leaves, meta = chaos.final_state(workdir)
  assert step == ref_step == STEPS and leaves.keys() == ref_leaves.keys()
  for k in leaves:
    assert leaves[k].tobytes() == ref_leaves[k].tobytes(), k
  # Logged train averages too: the window 6..10 straddles the interruption at 7.
  ref_sc, sc = chaos.read_scalars(ref_dir), chaos.read_scalars(workdir)
  assert sc.keys() == ref_sc.keys() and ("train/bpd", 10) in sc
  assert all(np.float32(sc[k]) == np.float32(ref_sc[k]) for k in sc)


def inject_nan(monkeypatch, steps):
  """Multiplies the diffusion term by NaN at `steps` (so loss and gradients go NaN too).

  The NaN comes out of the model's own terms, as a real one would: train_step draws
  step s's randomness from fold_in(key(seed), s), so the wrapper recognises the steps
  by their keys.
  """
  real = VAEVDM.elbo_terms
  seed = tiny().seed
  bad = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(seed), s))
                   for s in steps])

  def elbo_terms(self, params, x_int, rng, **kwargs):
    terms = real(self, params, x_int, rng, **kwargs)
    hit = jnp.any(jnp.all(jax.random.key_data(rng) == bad, axis=-1))
    return terms.replace(diffusion=terms.diffusion * jnp.where(hit, jnp.nan, 1.0))

  monkeypatch.setattr(VAEVDM, "elbo_terms", elbo_terms)


def test_nan_stops_naming_first_bad_step_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  inject_nan(monkeypatch, [7])
  with pytest.raises(reliability.NumericalError) as err:
    train.train_and_evaluate(tiny(), str(tmp_path))
  # Detected at the log step 10, but named at 7; nothing after step 5 was saved.
  assert str(err.value).startswith("training stopped: non-finite diffusion, loss, grad at "
                                   "step 7 (nan_policy='stop'); the last good checkpoint "
                                   "(step 5) is kept")
  assert chaos.steps_on_disk(str(tmp_path))[0] == [5]
  _, leaves, _ = chaos.final_state(str(tmp_path))
  assert all(np.all(np.isfinite(v)) for v in leaves.values())


def test_nan_skip_counts_and_continues(tmp_path, monkeypatch, capsys):
  inject_nan(monkeypatch, [3, 8])
  train.train_and_evaluate(tiny(nan_policy="skip"), str(tmp_path))
  _, leaves, _ = chaos.final_state(str(tmp_path))
  assert int(leaves["['step']"]) == STEPS and int(leaves["['health']['skipped']"]) == 2
  assert all(np.all(np.isfinite(v)) for v in leaves.values())
  # The optimiser saw 10 updates (its count is not advanced by a skipped step).
  counts = [v for k, v in leaves.items() if k.startswith("['opt_state']") and "count" in k]
  assert counts and all(int(c) == STEPS - 2 for c in counts)
  sc = chaos.read_scalars(str(tmp_path))
  assert [sc[("train/skipped_steps", s)] for s in (5, 10, 12)] == [1, 2, 2]
  out = capsys.readouterr().out
  assert "step 5: skipped 1 non-finite step(s) so far (last: step 3, diffusion, loss, grad)" in out


def test_evaluating_a_checkpoint_on_other_size_images(reference, tmp_path):
  ref_dir, _ = reference
  path = tmp_path / "big.npz"
  np.savez(path, images=np.zeros((20, 28, 28, 1), np.uint8))
  c = tiny()
  c.data.source = f"npz:{path}"
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"built for images of shape \(8, 8, 1\) but the data "
                           r"\(config.data.source\) has shape \(28, 28, 1\)"):
    train.evaluate_checkpoint(c, ref_dir)


def test_resuming_with_another_model_config(reference, tmp_path):
  ref_dir, _ = reference
  c = tiny()
  c.model.channels = 16
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"holds a checkpoint of a different model \(saved vs config: "
                           r"\{'channels': \(8, 16\)\}\)"):
    train.train_and_evaluate(c, ref_dir)
