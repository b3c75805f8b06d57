"""python -m spcl_jax.finetune --config=configs/finetune/nih14.py --workdir=F [--seeds=N]
[--config.init=PRETRAIN_WORKDIR|random|FILE] [--config.label_fraction=1|10|100] [--config.x=y]

One seed: F/ holds checkpoints, best/, metrics, selection.json and results.json. --seeds=N runs
seeds config.seed .. config.seed + N - 1 in F/seed_<s>/ one after another, then writes
F/results.json with their mean and std. Rerunning the same command resumes where it stopped
(the engine's rules: `spcl_jax.engine`, docs/engine.md). Several processes: --distributed, or
launch/local_multiprocess.sh with MODULE=spcl_jax.finetune.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from spcl_jax import command_line

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "configs/finetune/{nih14,chexpert,rsna,siim,custom}.py[:preset]",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results.json go.")
flags.DEFINE_integer("seeds", 1, "Seeds to run (config.seed, config.seed + 1, ...).")
command_line.define_training_run_flags("optim.learning_rate")
flags.mark_flags_as_required(["config", "workdir"])
parse_flags = command_line.absl_flags_parser(FLAGS)


def main(argv):
  if len(argv) > 1:
    command_line.fail_usage(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.seeds < 1:
    command_line.fail_usage(f"--seeds={FLAGS.seeds} must be >= 1")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  sys.exit(command_line.run_command(_finetune, debug=FLAGS.debug))


def _finetune() -> int:
  command_line.join_process_group(FLAGS)
  config = command_line.loaded_config(FLAGS)
  from spcl_jax.finetune import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_seeds(config, FLAGS.workdir, FLAGS.seeds, restore_step=FLAGS.restore_step,
                      allow_config_changes=FLAGS.allow_config_change)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
