"""Command line: python -m vdmrep.main --config CONFIG --workdir DIR [--mode train|eval|sample]."""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading

from absl import app, flags
from ml_collections import config_flags

from vdmrep import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "train (then evaluate), evaluate only, or sample (pictures + samples.npz).")
flags.DEFINE_string("eval_dir", None, "--mode eval: write the report, pictures and logs here "
                    "instead of the workdir (its report.json stays as it is).")
flags.DEFINE_bool("verbose", False, "Also print absl INFO logs (every scalar written to "
                  "TensorBoard), TensorFlow's and JAX's notices and the full report.")
flags.mark_flags_as_required(["config", "workdir"])

# Exit codes: 2 bad input (flags, config, data, workdir, checkpoint, unwritable or full
# disk); 3 training halted on a non-finite step; 128 + signum after SIGTERM/SIGINT
# (0 if training had finished and its checkpoint was saved).
BAD_INPUT = 2
_UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _fail(msg: str, code: int = BAD_INPUT):
  print(f"error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def _config_path(argv) -> str | None:
  """The file of --config FILE[:ARG], or None."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  return path.split(":")[0] if path else None


def _config_file_error(err: BaseException, argv) -> str:
  """One line for a config file that failed to load (ml_collections defers the error)."""
  path = _config_path(argv) or "?"
  if not os.path.isfile(path):
    return f"--config: config file {path!r} does not exist"
  for e in _chain(err):
    if isinstance(e, SyntaxError):
      return f"--config: {path} line {e.lineno}: syntax error: {e.msg}"
    if isinstance(e, AttributeError) and "get_config" in str(e):
      return f"--config: {path} defines no get_config()"
  root = list(_chain(err))[-1]
  return f"--config: {path} failed to load ({type(root).__name__}: {root})"


def _chain(err):
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    yield err
    err = err.__cause__ or err.__context__


def parse_flags(argv):
  """absl's parser, with every error (flags, config file, config override) as one line
  and exit 2 (absl exits 1; bad input is 2 here)."""
  path = _config_path(argv)
  if path and os.path.isfile(os.path.join(os.path.dirname(path), "common.py")):
    # configs/*.py import `configs.common`: the repository holding them must be importable
    # from any working directory.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
  try:
    rest = FLAGS(argv)
  except flags.Error as err:
    _fail(f"{err} (see --helpshort)")
  except AttributeError as err:  # an override of a key the config does not have
    if "get_config" in str(err):
      _fail(_config_file_error(err, argv))
    key = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")), "--config.?")
    _fail(f"{key}: no such config key ({err})")
  except Exception as err:  # a config file that fails while overrides are applied
    _fail(_config_file_error(err, argv))
  try:
    FLAGS.config.keys()  # config_flags keeps a load error until the config is used
  except Exception as err:
    _fail(_config_file_error(err, argv))
  return rest


def _interrupted_during_start_up(signum, frame):
  del frame
  print(f"interrupted by {signal.Signals(signum).name} during start-up; no checkpoint was "
        "changed, rerun the same command", file=sys.stderr, flush=True)
  sys.exit(128 + signum)


def resend_lost_interrupt(unraisable, default=sys.unraisablehook):
  """`sys.unraisablehook`: an interrupt raised while Python ran code it cannot propagate
  from (a gc callback such as jax's, a `__del__`) is reported as unraisable and dropped,
  and the run would carry on as if no signal had come. Send the signal again from a
  helper thread instead: the main thread takes it once out of that callback."""
  exc = unraisable.exc_value
  signum = getattr(exc, "signum", None)  # reliability.Interrupted
  if isinstance(exc, KeyboardInterrupt):
    signum = signal.SIGINT
  elif isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code > 128:
    signum = exc.code - 128  # _interrupted_during_start_up
  if signum is None:
    return default(unraisable)
  threading.Timer(0.01, signal.raise_signal, (signum,)).start()


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  if FLAGS.eval_dir and FLAGS.mode != "eval":
    _fail(f"--eval_dir is for --mode eval, not --mode {FLAGS.mode}")
  from vdmrep import console
  console.quiet_libraries(FLAGS.verbose)  # before TensorFlow is imported
  from vdmrep import checkpoints, data, reliability, storage, train  # heavy, after flags
  phase = {"train": "start-up", "eval": "evaluation", "sample": "sampling"}[FLAGS.mode]
  try:
    with reliability.raise_on_signals(phase):
      if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      elif FLAGS.mode == "sample":
        from vdmrep import sample_mode
        sample_mode.sample_checkpoint(FLAGS.config, FLAGS.workdir)
      else:
        train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, out=FLAGS.eval_dir)
  except (config_lib.ConfigError, data.DataError, checkpoints.CheckpointError) as err:
    storage.quiet_async_leftovers()
    _fail(err)
  except reliability.NumericalError as err:
    _fail(err, 3)
  except reliability.Interrupted as err:
    print(str(err), file=sys.stderr, flush=True)
    sys.exit(reliability.exit_code(err))
  except KeyboardInterrupt:  # SIGINT before the handlers were installed
    print(f"interrupted by SIGINT during {phase}", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)
  except Exception as err:  # a disk that filled or turned read-only under a writer
    bad = next((e for e in _chain(err) if getattr(e, "errno", None) in _UNWRITABLE), None)
    if bad is None and not storage.is_disk_full(err):
      raise
    storage.quiet_async_leftovers()
    why = os.strerror(bad.errno) if bad is not None else "No space left on device"
    where = getattr(bad, "filename", None) or FLAGS.workdir
    _fail(f"{where}: {why} (while writing results); checkpoints already saved are intact")


if __name__ == "__main__":
  sys.unraisablehook = resend_lost_interrupt
  for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _interrupted_during_start_up)
  app.run(main, flags_parser=parse_flags)
