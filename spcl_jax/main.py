"""Entry point: python -m spcl_jax.main --config=configs/vitb512.py --workdir=DIR [--config.x=y]

Parses flags, loads the config, calls `train.train_and_evaluate`. Rerunning the same command
resumes from the latest checkpoint in DIR. For several processes (multi-host GPU, TPU pods,
SLURM) add --distributed; see launch/.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from spcl_jax import command_line

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Python config file (configs/*.py, or your own building on "
                                "spcl_jax.configs).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go: a "
                    "folder, or a gs:// URL (pip install -e '.[gcs]').")
command_line.define_training_run_flags("seed,spcl.mask_ratio")
flags.mark_flags_as_required(["config", "workdir"])
parse_flags = command_line.absl_flags_parser(FLAGS)


def main(argv):
  if len(argv) > 1:
    command_line.fail_usage(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # orbax and grain log every file operation at INFO through absl: keep warnings only.
  absl_logging.set_verbosity(absl_logging.WARNING)
  sys.exit(command_line.run_command(_train, debug=FLAGS.debug))


def _train() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  command_line.join_process_group(FLAGS)
  from spcl_jax import evaluators, train  # pylint: disable=g-import-not-at-top
  config = command_line.loaded_config(FLAGS)
  summary = train.train_and_evaluate(config, FLAGS.workdir, restore_step=FLAGS.restore_step,
                                     allow_config_changes=FLAGS.allow_config_change)
  if jax.process_index() == 0:
    shown = ["step", *(k for k in evaluators.headline_keys(summary) if k != "step")]
    print("done: " + ", ".join(f"{k} {summary[k]:.4g}" for k in shown
                               if isinstance(summary.get(k), (int, float))), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
