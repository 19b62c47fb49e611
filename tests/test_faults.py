"""Numerical-fault guard (pure, no model) and the signal flag."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import config_lib, reliability
from vdmrep.train import TrainState

NAN = float("nan")


def fresh():
  return TrainState(step=jnp.asarray(0, jnp.int32), params={"w": jnp.ones(3)},
                    ema_params={"w": jnp.ones(3)}, opt_state={"m": jnp.zeros(3)},
                    health=reliability.init_health())


def proposed(state):
  """What an optimiser step would produce: every array changed, step + 1."""
  bump = lambda t: jax.tree.map(lambda x: x + 1.0, t)
  return state.replace(step=state.step + 1, params=bump(state.params),
                       ema_params=bump(state.ema_params), opt_state=bump(state.opt_state))


def run(bad_at: dict, n: int, policy: str, max_skips: int = 2):
  """n steps; bad_at maps step -> {term: value}; returns final state and per-step metrics."""
  guard = jax.jit(lambda s, n_, c, m: reliability.guard_step(s, n_, c, m, policy=policy,
                                                             max_skips=max_skips))
  state, logs = fresh(), []
  for i in range(n):
    checked = {k: jnp.asarray(1.0) for k in reliability.FAULT_TERMS}
    checked.update({k: jnp.asarray(v) for k, v in bad_at.get(i, {}).items()})
    state, m = guard(state, proposed(state), checked, {"bpd": checked["loss"]})
    logs.append(jax.device_get(m))
  return state, logs


def test_stop_freezes_at_first_bad_step_and_names_it():
  state, logs = run({3: {"diffusion": NAN, "grad": jnp.inf}, 5: {"kl": NAN}}, 8, "stop")
  h = jax.device_get(state.health)
  # Steps 0..2 applied (params 1 + 3); from step 3 on nothing changes, step included.
  assert int(state.step) == 3 and float(state.params["w"][0]) == 4.0
  assert float(state.opt_state["m"][0]) == 3.0
  assert int(h["halted_at"]) == 3 and reliability.term_names(h["halted_terms"]) == \
      "diffusion, grad"  # the first bad step's terms, not step 5's
  assert [float(m["good_steps"]) for m in logs] == [1, 1, 1, 0, 0, 0, 0, 0]
  assert all(np.isfinite(m["bpd"]) for m in logs)  # rejected steps are zeroed
  cfg = config_lib.base_config()
  with pytest.raises(reliability.NumericalError) as err:
    reliability.check_health(h, cfg, last_checkpoint=2)
  assert str(err.value).startswith("training stopped: non-finite diffusion, grad at step 3 "
                                   "(nan_policy='stop'); the last good checkpoint (step 2) "
                                   "is kept")


def test_skip_keeps_state_consumes_batch_and_counts():
  state, logs = run({2: {"loss": NAN}, 5: {"recon": jnp.inf}}, 8, "skip")
  h = jax.device_get(state.health)
  assert int(state.step) == 8  # every batch consumed
  assert float(state.params["w"][0]) == 1.0 + 6  # 6 of 8 updates applied
  assert int(h["skipped"]) == 2 and int(h["halted_at"]) == -1
  assert int(h["last_bad_step"]) == 5 and reliability.term_names(h["last_bad_terms"]) == "recon"
  assert reliability.skip_note(h) == "skipped 2 non-finite step(s) so far (last: step 5, recon)"
  reliability.check_health(h, config_lib.base_config(), last_checkpoint=None)  # no raise


def test_skip_halts_after_too_many_in_a_row():
  bad = {i: {"prior": NAN} for i in (4, 5, 6)}
  state, _ = run(bad, 9, "skip", max_skips=2)
  h = jax.device_get(state.health)
  assert int(h["halted_at"]) == 6 and int(h["skipped"]) == 2 and int(state.step) == 6
  cfg = config_lib.base_config()
  cfg.training.nan_policy, cfg.training.max_consecutive_skips = "skip", 2
  with pytest.raises(reliability.NumericalError,
                     match=r"3 consecutive non-finite steps ending at step 6 \(last: prior\), "
                           r"more than config.training.max_consecutive_skips=2"):
    reliability.check_health(h, cfg, last_checkpoint=5)


def test_fault_mask_bits():
  vals = {k: jnp.asarray(1.0) for k in reliability.FAULT_TERMS}
  vals.update(kl=jnp.asarray(-jnp.inf), loss=jnp.asarray(NAN))
  assert int(reliability.fault_mask(vals)) == (1 << 3) | (1 << 4)


def test_stop_flag_sets_on_first_signal_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with reliability.stop_on_signals() as flag:
    assert not flag
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag and flag.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  err = reliability.Interrupted(signal.SIGTERM, 7)
  assert reliability.exit_code(err) == 143
  assert str(err) == ("interrupted by SIGTERM at step 7; checkpoint saved, rerun the same "
                      "command to resume")


def test_second_signal_takes_the_default_action():
  import subprocess
  import sys
  script = ("import os, signal\n"
            "from vdmrep import reliability\n"
            "with reliability.stop_on_signals() as flag:\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  print('flag set', bool(flag), flush=True)\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  print('survived', flush=True)\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == -signal.SIGTERM
  assert proc.stdout == "flag set True\n"
