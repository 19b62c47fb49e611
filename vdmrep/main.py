"""Command line: python -m vdmrep.main --config CONFIG --workdir DIR [--mode train|eval|sample]."""
from __future__ import annotations

import sys

if __name__ == "__main__":  # before anything heavy: it may re-execute this process
  from vdmrep import hostmem
  hostmem.reexec_with_malloc_tunables()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vdmrep import config_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "train (then evaluate), evaluate only, or sample (pictures + samples.npz).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vdmrep import checkpoints, data, reliability, train  # heavy imports after flags
  # Exit codes: 2 bad input (config, data, workdir, checkpoint, disk full); 3 training
  # halted on a non-finite step; 128 + signum after SIGTERM/SIGINT saved a checkpoint.
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      from vdmrep import quality
      quality.sample_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, data.DataError, checkpoints.CheckpointError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  except reliability.NumericalError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(3)
  except reliability.Interrupted as err:
    print(str(err), file=sys.stderr)
    sys.exit(reliability.exit_code(err))


if __name__ == "__main__":
  app.run(main)
