"""Reliability round two: one owner per workdir, read errors are not corruption, every bad
input one line before any work, the resume policy, resources, messages and signals.

The fast tests use small pytrees, data arrays and configs; the `slow` ones launch the CLI
or train the tiny model (docs/reliability.md lists which test proves which guarantee).
"""
import errno
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from vdmrep import checkpoints, config_lib, data, preflight, reliability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import chaos  # TINY flags, steps_on_disk
from test_checkpoints import FP, STATE, make


def one_line(err) -> str:
  msg = str(err.value)
  assert "\n" not in msg
  return msg


def cli(workdir, *flags, config="configs/digits.py", timeout=600):
  return subprocess.run(
      [sys.executable, "-m", "vdmrep.main", "--config", config, "--workdir", str(workdir),
       *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error: ")]


# -- 1. one owner per workdir ------------------------------------------------------------

HOLD = ("import sys, time; sys.path.insert(0, {repo!r})\n"
        "from vdmrep import reliability\n"
        "with reliability.workdir_lock({wd!r}):\n"
        "  print('locked', flush=True); time.sleep(600)\n")


def test_second_trainer_is_refused_naming_the_holder_pid_and_lock_dies_with_it(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO, wd=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(checkpoints.CheckpointError) as err:
      with reliability.workdir_lock(str(tmp_path)):
        pass
    assert one_line(err) == (
        f"workdir {tmp_path} is in use by another training process (PID {holder.pid}, lock "
        f"{tmp_path / 'train.lock'}); wait for it to finish, stop it, or use another --workdir")
  finally:
    holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
    holder.wait()
  with reliability.workdir_lock(str(tmp_path)):  # the lock file is left; the lock is not
    assert (tmp_path / "train.lock").read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_cli_second_trainer_exits_2_before_compiling(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO, wd=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = cli(tmp_path, *chaos.TINY)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc.stderr) == [
      f"error: workdir {tmp_path} is in use by another training process (PID {holder.pid}, "
      f"lock {tmp_path / 'train.lock'}); wait for it to finish, stop it, or use another "
      "--workdir"]
  assert not (tmp_path / "checkpoints").exists()


def test_read_only_reader_moves_deletes_and_creates_nothing(tmp_path, capsys):
  make(tmp_path, [1, 2, 3]).close()
  ck = tmp_path / "checkpoints"
  tmp_dir = ck / "4.orbax-checkpoint-tmp-1234"  # a trainer's save in progress
  tmp_dir.mkdir()
  (tmp_dir / "partial").write_bytes(b"x")
  with open(ck / "3" / "meta" / "metadata", "r+b") as f:  # a corrupt latest record
    f.truncate(5)
  before = sorted(os.listdir(ck))
  reader = checkpoints.Checkpoints(str(tmp_path), keep=3, read_only=True)
  state, meta = reader.restore_latest(checkpoints.abstract(STATE), FP, (8, 8, 1))
  reader.close()
  assert meta["step"] == 2
  assert sorted(os.listdir(ck)) == before  # tmp dir and corrupt step untouched
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert "left in place (this run only reads checkpoints)" in capsys.readouterr().out
  # A workdir without checkpoints: nothing is created.
  empty = tmp_path / "empty"
  empty.mkdir()
  reader = checkpoints.Checkpoints(str(empty), keep=3, read_only=True)
  assert reader.latest_step() is None
  assert os.listdir(empty) == []


def test_read_only_reader_skips_a_step_that_vanishes(tmp_path, monkeypatch, capsys):
  """The trainer's retention deletes the step between listing and reading it."""
  make(tmp_path, [1, 2]).close()
  real = checkpoints.Checkpoints.restore

  def vanish(self, step, abstract_state):
    if step == 2:
      os.rename(self.step_path(2), str(tmp_path / "gone"))
      raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.step_path(2))
    return real(self, step, abstract_state)

  monkeypatch.setattr(checkpoints.Checkpoints, "restore", vanish)
  reader = checkpoints.Checkpoints(str(tmp_path), keep=3, read_only=True)
  _, meta = reader.restore_latest(checkpoints.abstract(STATE), FP, (8, 8, 1))
  assert meta["step"] == 1
  assert "unreadable" not in capsys.readouterr().out  # vanished is not corrupt


def test_read_only_reader_follows_the_trainer_past_its_first_listing(tmp_path):
  """The reader listed steps [1, 2]; the trainer then saved 3 and 4 and its retention
  deleted 1 and 2: the reader lists again and restores 4 (a stale list made it give up
  with 'no readable checkpoint')."""
  make(tmp_path, [1, 2]).close()
  reader = checkpoints.Checkpoints(str(tmp_path), keep=3, read_only=True)
  assert reader.latest_step() == 2
  make(tmp_path, [3, 4], keep=2).close()  # the trainer's retention: 1 and 2 deleted
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]
  state, meta = reader.restore_latest(checkpoints.abstract(STATE), FP, (8, 8, 1))
  reader.close()
  assert meta["step"] == 4 and float(state["a"][1]) == 4.0
  assert reader.skipped == []  # vanished steps are not called unreadable


def test_training_pid_probe_sees_a_live_trainer_only(tmp_path):
  assert reliability.training_pid(str(tmp_path)) is None
  assert os.listdir(tmp_path) == []  # the probe creates nothing
  holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO, wd=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert reliability.training_pid(str(tmp_path)) == str(holder.pid)
  finally:
    holder.kill()
    holder.wait()
  assert reliability.training_pid(str(tmp_path)) is None  # lock file left, lock gone
  with reliability.workdir_lock(str(tmp_path)):  # a probe never blocks a trainer
    pass


# Evaluators enough for a report (what these process tests check), not every one.
SHORT_EVAL = ["--config.eval.evaluators=elbo,baselines,latents"]


@pytest.mark.slow
def test_eval_during_training_leaves_the_trainer_alone(tmp_path):
  """--mode eval twice while a trainer saves every 5 steps (and deletes all but the last
  3): every process exits 0; each evaluation reads the latest complete checkpoint and
  writes into evals/step<N>/, so the trainer's reports are its own; nothing moved."""
  workdir = str(tmp_path / "w")
  trainer = subprocess.Popen(
      [sys.executable, "-m", "vdmrep.main", "--config", "configs/digits.py", "--workdir",
       workdir, "--config.training.num_steps=60"] + chaos.TINY + SHORT_EVAL, cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 900
  while not chaos.steps_on_disk(workdir)[0] and time.time() < deadline:
    time.sleep(0.5)
  evals = []
  for _ in range(2):
    if trainer.poll() is None:
      evals.append(cli(workdir, "--mode", "eval", *chaos.TINY, *SHORT_EVAL, timeout=1200))
  out, _ = trainer.communicate(timeout=1800)
  assert trainer.returncode == 0, out[-3000:]
  assert "saving checkpoint" not in out and "Traceback" not in out
  assert evals, "the trainer finished before an evaluation could start"
  for e in evals:
    assert e.returncode == 0, e.stderr[-3000:]
    assert "Traceback" not in e.stderr
    if "is being trained" not in e.stdout:  # the trainer had finished when it started
      continue
    note = re.search(rf"^note: workdir {re.escape(workdir)} is being trained \(PID "
                     rf"{trainer.pid}\); evaluating its latest complete checkpoint \(step "
                     r"(\d+)\) into (\S+)$", e.stdout, re.M)
    assert note, e.stdout[-2000:]
    step = int(note.group(1))
    assert note.group(2) == os.path.join(workdir, "evals", f"step{step}")
    with open(os.path.join(note.group(2), "report.json")) as f:
      assert json.load(f)["step"] == step
  assert any("is being trained" in e.stdout for e in evals), [e.stdout[-500:] for e in evals]
  with open(os.path.join(workdir, "report.json")) as f:
    assert json.load(f)["step"] == 60  # the trainer's final report, not an evaluator's
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
  assert chaos.steps_on_disk(workdir)[0][-1] == 60


# -- 2. corruption means corruption ------------------------------------------------------


@pytest.mark.parametrize("raised", [
    OSError(errno.EIO, "Input/output error"),
    ValueError("UNKNOWN: Error reading \"d/123\": [OS error: Input/output error]"),
    MemoryError(),
], ids=["oserror", "tensorstore_text", "memory"])
def test_read_error_on_restore_moves_nothing(tmp_path, monkeypatch, raised):
  make(tmp_path, [1, 2]).close()

  def fail(self, step, abstract_state):
    raise raised

  monkeypatch.setattr(checkpoints.Checkpoints, "restore", fail)
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  with pytest.raises(checkpoints.CheckpointError) as err:
    ckpt.restore_latest(checkpoints.abstract(STATE), FP, (8, 8, 1))
  msg = one_line(err)
  assert msg.startswith(f"reading checkpoint {tmp_path / 'checkpoints' / '2'} failed (")
  assert msg.endswith("it is a storage or memory error, not corruption, so nothing was "
                      "moved: fix the cause and rerun")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_another_programs_checkpoint_is_left_in_place(tmp_path):
  mgr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  mgr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(STATE)))
  mgr.wait_until_finished()
  mgr.close()
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  with pytest.raises(checkpoints.CheckpointError) as err:
    ckpt.restore_latest(checkpoints.abstract(STATE), FP, (8, 8, 1))
  assert one_line(err) == (
      f"{tmp_path / 'checkpoints' / '5'} is a checkpoint in another format (items ['params'], "
      f"expected ['meta', 'state']); it was left in place: move it out of "
      f"{tmp_path / 'checkpoints'} or use another --workdir")
  assert (tmp_path / "checkpoints" / "5").is_dir()


def test_older_state_tree_is_a_version_mismatch_not_corruption(tmp_path):
  make(tmp_path, [1]).close()
  newer = dict(STATE, health=STATE["a"][:1])  # this version's state has one more leaf
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=3)
  with pytest.raises(checkpoints.CheckpointError, match=r"holds a train state of another "
                     r"vdmrep version \(missing \['health'\]"):
    ckpt.restore_latest(checkpoints.abstract(newer), FP, (8, 8, 1))
  assert (tmp_path / "checkpoints" / "1").is_dir()


# -- 3. validation before any work -------------------------------------------------------


@pytest.mark.parametrize("key,value,expected", [
    ("optim.eps", -1.0, "config.optim.eps=-1.0 must be > 0.0"),
    ("optim.lr", float("inf"), "config.optim.lr=inf must be a finite number"),
    ("model.gamma_max", float("inf"), "config.model.gamma_max=inf must be a finite number"),
    ("optim.weight_decay", float("nan"), "config.optim.weight_decay=nan must be a finite "
                                         "number"),
    ("data.max_train_examples", -5, "config.data.max_train_examples=-5 must be >= 0"),
    ("eval.max_examples", -1, "config.eval.max_examples=-1 must be >= 0"),
    ("seed", -1, "config.seed=-1 must be >= 0"),
])
def test_every_number_finite_and_in_its_domain(key, value, expected):
  c = config_lib.base_config()
  *sections, name = key.split(".")
  (c[sections[0]] if sections else c)[name] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c)
  assert one_line(err).startswith(expected)


def test_defaults_and_shipped_configs_pass_the_numeric_checks():
  import importlib.util
  assert preflight.config_problem(config_lib.base_config()) is None
  for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if name.endswith(".py") and not name.startswith("_"):
      spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs",
                                                                            name))
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      if hasattr(mod, "get_config"):
        assert preflight.config_problem(mod.get_config()) is None, name


def digits(**cfg):
  c = config_lib.base_config()
  for k, v in cfg.items():
    section, name = k.split("__")
    c[section][name] = v
  return data.load(c.data), c


def test_vocab_size_below_the_datas_range():
  ds, c = digits(model__vocab_size=2)
  with pytest.raises(data.DataError) as err:
    preflight.check_dataset(ds, c)
  assert one_line(err) == ("digits: pixel values reach 255 but config.model.vocab_size=2 "
                           "(pixels must be < vocab_size); set config.model.vocab_size=256")


def npz(tmp_path, compressed=False, **arrays):
  path = tmp_path / "d.npz"
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return str(path)


IMAGES = np.random.default_rng(0).integers(0, 256, (20, 8, 8), np.uint8)


@pytest.mark.parametrize("labels,expected", [
    (np.full(20, 1e12), "labels must be classes in [0, 2**31); got range [1e+12, 1e+12]"),
    (np.full(20, np.nan), "labels must be whole numbers; got non-finite or fractional values"),
    (np.zeros((20, 2, 2), np.int64), "labels must be [N] (one class per image); got shape "
                                     "(20, 2, 2)"),
    (np.zeros(7, np.int64), "7 labels for 20 images"),
    (np.array(["a"] * 20), "labels must be integer classes; got dtype <U1"),
], ids=["huge", "nan", "3d", "count", "strings"])
def test_bad_labels_are_refused_when_loaded(tmp_path, labels, expected):
  path = npz(tmp_path, images=IMAGES, labels=labels)
  c = config_lib.base_config()
  c.data.source = f"npz:{path}"
  with pytest.raises(data.DataError) as err:
    data.load(c.data)
  assert one_line(err) == f"{path}['labels']: {expected}"


def test_one_class_labels_and_one_image_are_refused_before_training(tmp_path):
  c = config_lib.base_config()
  c.data.source = f"npz:{npz(tmp_path, images=IMAGES, labels=np.full(20, 3))}"
  with pytest.raises(data.DataError, match=r"hold one class \(\[3\]\); the probes need at "
                     "least two"):
    preflight.check_dataset(data.load(c.data), c)
  c.data.source = f"npz:{npz(tmp_path, images=IMAGES[:1])}"
  with pytest.raises(data.DataError, match="no training images left"):
    preflight.check_dataset(data.load(c.data), c)


@pytest.mark.slow
def test_cli_bad_labels_exit_2_before_training(tmp_path):
  path = npz(tmp_path, images=IMAGES, labels=np.full(20, 3))
  proc = cli(tmp_path / "w", f"--config.data.source=npz:{path}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert len(error_lines(proc.stderr)) == 1 and "hold one class" in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_truncated_idx_files_are_one_line(tmp_path):
  raw = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (2).to_bytes(4, "big")
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)  # header cut after 2 dims
  with pytest.raises(data.DataError) as err:
    data.read_idx(str(tmp_path / "t10k-images-idx3-ubyte"))
  assert one_line(err).endswith("truncated header (12 bytes for 3 dimensions)")
  full = gzip.compress(raw + (2).to_bytes(4, "big") + bytes(20))
  (tmp_path / "x.gz").write_bytes(full[:len(full) // 2])
  with pytest.raises(data.DataError) as err:
    data.read_idx(str(tmp_path / "x.gz"))
  assert one_line(err).startswith(f"cannot read idx file {tmp_path / 'x.gz'}: EOFError")


def test_checkpoints_path_that_is_a_file(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  for check in (lambda: reliability.check_workdir(str(tmp_path)),
                lambda: checkpoints.Checkpoints(str(tmp_path), keep=3, read_only=True)):
    with pytest.raises(checkpoints.CheckpointError) as err:
      check()
    assert one_line(err) == (f"{tmp_path / 'checkpoints'} exists but is not a directory; "
                             "move it away or use another --workdir")


@pytest.mark.parametrize("flags,expected", [
    (["--config", "configs/nope.py"], "error: --config: config file 'configs/nope.py' does "
                                      "not exist"),
    (["--config", "configs/digits.py", "--config.training.bogus=1"],
     "error: --config.training.bogus: no such config key"),
    (["--config", "configs/digits.py", "--config.training.batch_size=abc"],
     "error: flag --config.training.batch_size=abc: invalid literal for int()"),
    (["--config", "configs/digits.py", "--nosuchflag"],
     "error: Unknown command line flag 'nosuchflag'"),
    (["--config", "BROKEN"], "error: --config: BROKEN line 1: syntax error: '(' was never "
                             "closed"),
    (["--config", "NOGET"], "error: --config: NOGET defines no get_config()"),
], ids=["missing", "unknown_key", "bad_value", "unknown_flag", "broken", "no_get_config"])
def test_flag_and_config_file_errors_are_one_line_exit_2(tmp_path, flags, expected):
  (tmp_path / "broken.py").write_text("x = (\n")
  (tmp_path / "noget.py").write_text("x = 1\n")
  flags = [str(tmp_path / "broken.py") if f == "BROKEN" else
           str(tmp_path / "noget.py") if f == "NOGET" else f for f in flags]
  expected = expected.replace("BROKEN", str(tmp_path / "broken.py")).replace(
      "NOGET", str(tmp_path / "noget.py"))
  proc = subprocess.run([sys.executable, "-m", "vdmrep.main", "--workdir",
                         str(tmp_path / "w"), *flags], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(expected), proc.stderr


# -- 4. resume policy --------------------------------------------------------------------


def test_resume_with_other_settings_is_refused_naming_them():
  saved = config_lib.base_config()
  meta = {"config": saved.to_dict(), "data_sha256": "abc"}
  now = config_lib.base_config()
  now.optim.lr, now.training.batch_size, now.seed = 1e-3, 32, 3
  with pytest.raises(checkpoints.CheckpointError) as err:
    preflight.check_resume(meta, now, "abd", "/w/checkpoints")
  assert one_line(err) == (
      "/w/checkpoints holds a run saved with other settings (seed: 0 -> 3; "
      "training.batch_size: 64 -> 32; optim.lr: 0.0002 -> 0.001; the training data (images or "
      "labels) differ from the saved run's); rerun with the saved settings, use another "
      "--workdir, or pass --config.training.allow_config_change=True to continue with the "
      "new ones")
  now.training.allow_config_change = True
  assert len(preflight.check_resume(meta, now, "abd", "/w/checkpoints")) == 4
  assert preflight.check_resume(meta, saved, "abc", "/w/checkpoints") == []


# -- 5. resources ------------------------------------------------------------------------


def test_memory_estimate_refuses_a_huge_batch_with_an_override():
  c = config_lib.base_config()
  c.training.batch_size = 10**9
  msg = preflight.memory_problem(c, (28, 28, 1), 1_000_000)
  assert msg is not None and "\n" not in msg
  assert msg.startswith("training needs at least ")
  assert msg.endswith("set config.training.memory_check=False to try anyway")
  c.training.batch_size = 64
  assert preflight.memory_problem(c, (28, 28, 1), 1_000_000) is None
  c.training.batch_size, c.training.memory_check = 10**9, False
  assert preflight.memory_problem(c, (28, 28, 1), 1_000_000) is None


def test_npz_decompression_is_capped_relative_to_the_file(tmp_path):
  path = npz(tmp_path, compressed=True, images=np.zeros((2000, 32, 32), np.uint8))
  c = config_lib.base_config()
  c.data.source = f"npz:{path}"
  with pytest.raises(data.DataError) as err:
    data.load(c.data)
  assert re.fullmatch(rf"npz source: '{re.escape(path)}' expands from [\d,]+ to [\d,]+ bytes, "
                      r"more than config.data.npz_max_expansion=100 times its size; raise "
                      r"that \(0 = no cap\) if the data is meant to be this large",
                      one_line(err))
  c.data.npz_max_expansion = 0
  assert data.load(c.data).train_images.shape[0] > 0


# -- 7. messages and signals -------------------------------------------------------------


def test_a_text_file_named_npz_says_so(tmp_path):
  path = tmp_path / "d.npz"
  path.write_text("images,labels\n1,2\n")
  c = config_lib.base_config()
  c.data.source = f"npz:{path}"
  with pytest.raises(data.DataError) as err:
    data.load(c.data)
  assert one_line(err) == (f"npz source: '{path}' is not an .npz (zip) archive; write it with "
                           "numpy.savez or numpy.savez_compressed")


def test_interrupted_exit_codes():
  assert reliability.exit_code(reliability.Interrupted(signal.SIGTERM, 7)) == 143
  done = reliability.Interrupted(signal.SIGTERM, 7, finished=True, phase="the final evaluation")
  assert reliability.exit_code(done) == 0
  assert str(done) == ("interrupted by SIGTERM during the final evaluation; training had "
                       "finished and checkpoint step 7 is saved; run --mode eval to evaluate it")
  assert not isinstance(done, Exception)  # no `except Exception` swallows it


@pytest.mark.slow
def test_sigint_at_start_up_and_progress_within_seconds(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-m", "vdmrep.main", "--config", "configs/digits.py", "--workdir",
       str(tmp_path / "w")] + chaos.TINY, cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  start = time.time()
  first = proc.stdout.readline()
  took = time.time() - start
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert first.startswith("loading data (digits)")
  assert took < 120  # imports of jax and TF on a shared 2-core machine; seconds otherwise
  assert proc.returncode == 130 and "Traceback" not in err
  assert re.search(r"^interrupted by SIGINT during start-up", err, re.M), err[-2000:]


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_exits_0(tmp_path):
  """The final checkpoint is saved before the final evaluation; a SIGTERM during that
  evaluation ends a finished job (exit 0), so a scheduler does not requeue it."""
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "vdmrep.main", "--config", "configs/digits.py", "--workdir",
       workdir, "--config.training.num_steps=10"] + chaos.TINY, cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 900
  while 10 not in chaos.steps_on_disk(workdir)[0] and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "finished before the final evaluation could be interrupted"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  # (during the last save's final writes if the signal came as the step directory appeared)
  assert re.search(r"^interrupted by SIGTERM during the final (evaluation|save); training had "
                   r"finished and checkpoint step 10 is saved", err, re.M), err[-2000:]
  assert "Traceback" not in err
  steps, tmp = chaos.steps_on_disk(workdir)
  assert steps[-1] == 10 and tmp == []


DISK_FULL = """
import errno, sys
sys.path.insert(0, {repo!r})
from orbax.checkpoint._src.handlers import json_checkpoint_handler as j
async def full(self, x, directory):
  raise OSError(errno.ENOSPC, "No space left on device")
j.JsonCheckpointHandler._save_fn = full
from absl import app
from vdmrep import main
sys.argv = ["main", "--config", "configs/digits.py", "--workdir", {wd!r},
            "--config.training.num_steps=5"] + {tiny!r}
app.run(main.main, flags_parser=main.parse_flags)
"""


LEFTOVERS = """
import asyncio, errno, gc, sys, threading
sys.path.insert(0, {repo!r})
if {quiet!r}:
  from vdmrep import checkpoints  # noqa: installs the hooks
import tensorstore as ts
from orbax.checkpoint._src import asyncio_utils

promise, write = ts.Promise.new()  # a tensorstore write still in flight


async def fail(err):
  raise err


async def save():
  asyncio.get_running_loop().create_task(asyncio_utils.cancellable(write))
  asyncio.gather(fail(OSError(errno.ENOSPC, "No space left on device")))  # never awaited
  asyncio.gather(fail(ValueError("a bug")))  # never awaited, not a storage error
  await asyncio.sleep(0.01)
  raise OSError(errno.ENOSPC, "No space left on device")


loop = asyncio.new_event_loop()  # as orbax runs a save: a loop of its own, then closed
try:
  loop.run_until_complete(save())
except OSError as e:
  print("save failed:", e, file=sys.stderr)
loop.close()
t = threading.Thread(target=promise.set_result, args=(1,))  # the write completes late
t.start()
t.join()
gc.collect()
print("end", file=sys.stderr)
"""


@pytest.mark.parametrize("quiet", [False, True], ids=["without_hooks", "with_hooks"])
def test_the_remains_of_a_failed_save_print_nothing(quiet):
  """What orbax leaves when a save fails, reproduced: a gathered future holding the disk
  error that nobody awaits, a task waiting on a tensorstore write, the loop closed, then
  the write completing in tensorstore's thread. Without vdmrep.storage's hooks (installed
  when vdmrep.checkpoints is imported) that prints three tracebacks; with them, only a
  report unrelated to storage remains."""
  proc = subprocess.run([sys.executable, "-c", LEFTOVERS.format(repo=REPO, quiet=quiet)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = "\n".join(l for l in proc.stderr.splitlines() if not re.match(r"[IW]\d{4} ", l)
                  and not l.startswith("WARNING: All log messages before absl"))
  noise = ("OSError(28, 'No space left on device')", "RuntimeError: Event loop is closed",
           "Task was destroyed but it is pending")
  assert [n in err for n in noise] == [not quiet] * 3, err
  assert "exception=ValueError('a bug')" in err  # other reports still get through
  assert "save failed: [Errno 28] No space left on device\n" in err
  if quiet:  # and nothing after the failure
    assert err.endswith("save failed: [Errno 28] No space left on device\nend"), err


@pytest.mark.slow
def test_disk_full_is_one_line_and_nothing_else(tmp_path):
  script = DISK_FULL.format(repo=REPO, wd=str(tmp_path / "w"), tiny=chaos.TINY)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if not re.match(r"[IW]\d{4} ", l)
           and not l.startswith("WARNING: All log messages before absl::InitializeLog()")]
  assert lines == [f"error: disk full while saving checkpoint step 5 in {tmp_path}/w/checkpoints"
                   "; no earlier checkpoint exists; free space and rerun to resume"], lines


UNWRITABLE = """
import errno, sys
sys.path.insert(0, {repo!r})
from absl import app
from vdmrep import main, train
def evaluate_checkpoint(config, workdir, out=None):
  try:
    raise OSError({errno_!r}, "x", workdir + "/report.json")
  except OSError as err:
    raise RuntimeError("writer failed") from err  # as TF/clu wrap it
train.evaluate_checkpoint = evaluate_checkpoint
sys.argv = ["main", "--config", "configs/digits.py", "--workdir", {wd!r}, "--mode", "eval"]
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("errno_,why", [(errno.EROFS, "Read-only file system"),
                                        (errno.ENOSPC, "No space left on device")],
                         ids=["read_only", "full"])
def test_eval_writer_on_an_unwritable_disk_is_one_line(tmp_path, errno_, why):
  script = UNWRITABLE.format(repo=REPO, wd=str(tmp_path), errno_=errno_)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc.stderr) == [
      f"error: {tmp_path}/report.json: {why} (while writing results); checkpoints already "
      "saved are intact"]


LOST_IN_GC = """
import gc, signal, sys, time
from vdmrep import main
sys.unraisablehook = main.resend_lost_interrupt
signal.signal(signal.SIGINT, main._interrupted_during_start_up)
fired = []
def callback(phase, info):  # the signal arrives while the collector runs a callback
  if phase == "start" and not fired:
    fired.append(1)
    signal.raise_signal(signal.SIGINT)
gc.callbacks.append(callback)
gc.collect()
deadline = time.time() + 20
while time.time() < deadline:
  time.sleep(0.01)
print("the interrupt was lost")
"""


def test_an_interrupt_raised_inside_a_gc_callback_is_not_lost():
  """A signal handler's exit raised inside a gc callback (jax registers one) is dropped by
  Python as unraisable; the process then ran on, training for hours after a Ctrl-C."""
  proc = subprocess.run([sys.executable, "-c", LOST_IN_GC], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert "the interrupt was lost" not in proc.stdout
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert "interrupted by SIGINT during start-up" in proc.stderr
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
