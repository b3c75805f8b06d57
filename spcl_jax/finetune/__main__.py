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
config_flags.DEFINE_config_file("config", None, "configs/finetune/{nih14,chexpert,rsna,siim,custom}.py[:preset]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results.json go.")
flags.DEFINE_integer("seeds", 1, "Seeds to run (config.seed, config.seed + 1, ...).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (auto-detects SLURM, TPU pods, MPI; "
                  "else give --coordinator_address, --num_processes, --process_id).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Total processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_integer("restore_step", None,
                     "Resume from this checkpoint step instead of the latest; the checkpoints "
                     "after it are moved to WORKDIR/checkpoints_superseded/.")
flags.DEFINE_list("allow_config_change", [],
                  "Config fields (e.g. optim.learning_rate) a resume may change although they "
                  "decide what is trained; recorded in WORKDIR/history.jsonl.")
flags.DEFINE_bool("debug", False, "Print the full traceback of an error.")
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
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  config = command_line.loaded_config(FLAGS)
  from spcl_jax.finetune import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_seeds(config, FLAGS.workdir, FLAGS.seeds, restore_step=FLAGS.restore_step,
                      allow_config_changes=FLAGS.allow_config_change)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
