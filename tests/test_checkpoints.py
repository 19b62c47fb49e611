"""Checkpoint guarantees on small pytrees (no model): atomic saves, corrupt-latest
fallback, retention of the last N plus the best, disk full, incompatible workdirs."""
import errno
import glob
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from vdmrep import checkpoints, reliability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = {"a": jnp.arange(64, dtype=jnp.float32), "b": {"c": jnp.ones((4, 5), jnp.float32)}}
FP = {"vdm": "mvdm", "encoder": "te"}


def state_at(step):
  return jax.tree.map(lambda x: x * step, STATE)


def meta_at(step, shape=(8, 8, 1)):
  return {"step": step, "model_fingerprint": FP, "image_shape": list(shape)}


def make(workdir, steps, keep=3, metrics=None):
  ckpt = checkpoints.Checkpoints(str(workdir), keep=keep)
  for s in steps:
    ckpt.save(s, state_at(s), meta_at(s), metrics=(metrics or {}).get(s))
  return ckpt


def restored_step(workdir):
  ckpt = checkpoints.Checkpoints(str(workdir), keep=3)
  state, meta = ckpt.restore_latest(checkpoints.abstract(STATE), FP, (8, 8, 1))
  ckpt.close()
  np.testing.assert_array_equal(state["a"], np.arange(64) * meta["step"])
  return meta["step"]


def _trunc(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garble(path):
  with open(path, "wb") as f:
    f.write(b"\x00garbage" * 8)


CORRUPTIONS = {
    # every file of the array store cut in half (a kill mid-copy, a full disk)
    "truncated_arrays": lambda d: [_trunc(f) for f in glob.glob(f"{d}/state/**", recursive=True)
                                   if os.path.isfile(f)],
    # array data files overwritten
    "garbled_arrays": lambda d: [_garble(f) for f in glob.glob(f"{d}/state/**/d/*",
                                                               recursive=True)],
    # the JSON record truncated
    "truncated_record": lambda d: _trunc(f"{d}/meta/metadata"),
    # the step directory emptied
    "empty_step_dir": lambda d: [os.rename(p, p + ".gone") for p in glob.glob(f"{d}/*")
                                 if os.path.isdir(p)],
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_latest_is_reported_by_name_and_previous_used(tmp_path, capsys, how):
  make(tmp_path, [1, 2, 3]).close()
  CORRUPTIONS[how](str(tmp_path / "checkpoints" / "3"))
  assert restored_step(tmp_path) == 2
  out = capsys.readouterr().out
  assert f"checkpoint {tmp_path / 'checkpoints' / '3'} is unreadable" in out
  assert "trying the previous one" in out
  # Moved aside (kept for inspection), so training can save step 3 again.
  assert len(glob.glob(str(tmp_path / "corrupt_checkpoints" / "3-*"))) == 1
  assert not (tmp_path / "checkpoints" / "3").exists()


def test_silent_bit_flip_caught_by_digest(tmp_path, capsys, monkeypatch):
  """Arrays that read back fine but differ from what was saved: the SHA-256 catches it."""
  make(tmp_path, [1, 2]).close()
  real = checkpoints.Checkpoints.restore

  def flipped(self, step, abstract_state):
    state = real(self, step, abstract_state)
    return jax.tree.map(lambda x: x.at[0].add(1.0), state) if step == 2 else state

  monkeypatch.setattr(checkpoints.Checkpoints, "restore", flipped)
  assert restored_step(tmp_path) == 1
  assert "do not match the SHA-256" in capsys.readouterr().out


def test_all_unreadable_raises_naming_directory(tmp_path):
  make(tmp_path, [1]).close()
  _trunc(str(tmp_path / "checkpoints" / "1" / "meta" / "metadata"))
  with pytest.raises(checkpoints.CheckpointError, match="no readable checkpoint left in .*"
                     "corrupt_checkpoints"):
    restored_step(tmp_path)


def test_kill_during_save_keeps_previous(tmp_path):
  """SIGKILL in the middle of saving step 2 (arrays written, record being written)."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
      from test_checkpoints import make, state_at, meta_at
      from orbax.checkpoint._src.handlers import json_checkpoint_handler as j
      ckpt = make({str(tmp_path)!r}, [1])
      async def die(self, x, directory):
        os.kill(os.getpid(), signal.SIGKILL)
      j.JsonCheckpointHandler._save_fn = die
      ckpt.save(2, state_at(2), meta_at(2))
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  names = os.listdir(tmp_path / "checkpoints")
  assert "1" in names and "2" not in names
  assert any(n.startswith("2.") and "tmp" in n for n in names), names  # the half-written one
  assert restored_step(tmp_path) == 1
  # The restarted run saves step 2 again; the half-written tmp dir is gone by then.
  make(tmp_path, [2]).close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert restored_step(tmp_path) == 2


def test_keeps_last_n_and_best(tmp_path):
  # eval bpd at steps 2 (best), 4, 6; keep = 2 -> {2 (best), 5, 6}
  metrics = {2: {"eval_bpd": 1.5}, 4: {"eval_bpd": 2.0}, 6: {"eval_bpd": 1.7}}
  ckpt = make(tmp_path, [1, 2, 3, 4, 5, 6], keep=2, metrics=metrics)
  assert sorted(ckpt.manager.all_steps()) == [2, 5, 6]
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
  ckpt.save(7, state_at(7), meta_at(7), metrics={"eval_bpd": 1.2})  # a new best
  ckpt.save(8, state_at(8), meta_at(8))
  assert sorted(ckpt.manager.all_steps()) == [7, 8] and ckpt.best_step() == 7
  ckpt.close()


def test_disk_full_during_save_says_so_and_keeps_previous(tmp_path, monkeypatch):
  ckpt = make(tmp_path, [1])

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full)
  with pytest.raises(checkpoints.CheckpointError) as err:
    ckpt.save(2, state_at(2), meta_at(2))
  msg = str(err.value)
  assert msg.startswith("disk full while saving checkpoint step 2 in ")
  assert "the previous checkpoint (step 1) is intact" in msg and "\n" not in msg
  ckpt.close()
  monkeypatch.undo()
  assert restored_step(tmp_path) == 1


def test_different_model_config_is_refused_before_reading_arrays(tmp_path):
  make(tmp_path, [1]).close()
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  other = dict(FP, vdm="tvdm")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"holds a checkpoint of a different model \(saved vs config: "
                           r"\{'vdm': \('mvdm', 'tvdm'\)\}\)"):
    ckpt.check_latest_compatible(other, (8, 8, 1))


def test_image_size_mismatch_is_refused(tmp_path):
  make(tmp_path, [1]).close()
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"built for images of shape \(8, 8, 1\) but the data "
                           r"\(config.data.source\) has shape \(28, 28, 1\)"):
    ckpt.check_latest_compatible(FP, (28, 28, 1))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(checkpoints.CheckpointError,
                     match=f"workdir '{blocker}/run' is not writable: Not a directory"):
    reliability.check_workdir(str(blocker / "run"))
