"""python -m spcl_jax.finetune --config=configs/finetune/nih14.py --workdir=F [--seeds=N]
[--config.init=PRETRAIN_WORKDIR|random|FILE] [--config.label_fraction=1|10|100] [--config.x=y]

One seed: F/ holds checkpoints, best/, metrics, selection.json and results.json. --seeds=N runs
seeds config.seed .. config.seed + N - 1 in F/seed_<s>/ one after another, then writes
F/results.json with their mean and std. Rerunning the same command resumes where it stopped.
"""

import logging
import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/finetune/{nih14,chexpert,rsna}.py",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results.json go.")
flags.DEFINE_integer("seeds", 1, "Seeds to run (config.seed, config.seed + 1, ...).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with one-line errors for a bad --config override (as spcl_jax.main)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.x path that is not there
    overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
    _fail(f"unknown config field {str(e).strip(chr(34))} in: {overrides}")
  except (TypeError, ValueError) as e:
    _fail(f"bad command line: {e}")
  return []


def run_seeds(config, workdir: str, num_seeds: int) -> dict:
  """One run per seed in WORKDIR/seed_<s>/ and the aggregate WORKDIR/results.json."""
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune import results, trainer  # pylint: disable=g-import-not-at-top
  if num_seeds == 1:
    return trainer.train_and_evaluate(config, workdir)
  root = pathlib.Path(workdir).expanduser().resolve()
  first = int(config.seed)
  per_seed, paths = [], []
  for seed in range(first, first + num_seeds):
    config.seed = seed
    if jax.process_index() == 0:
      print(f"--- seed {seed} ({seed - first + 1}/{num_seeds}) ---", flush=True)
    outcome = trainer.train_and_evaluate(config, str(root / f"seed_{seed}"))
    if "stopped_at_step" in outcome:
      return outcome
    per_seed.append(outcome)
    paths.append(f"seed_{seed}/{trainer.RESULTS_FILE}")
  config.seed = first
  summary = results.aggregate(per_seed, paths)
  if jax.process_index() == 0:
    results.write_json(root / trainer.RESULTS_FILE, summary)
    t = summary["test_at_best_val"]
    print(f"{num_seeds} seeds: test macro AUC {t['macro_auc']:.4f} +- {t['macro_auc_std']:.4f}"
          f"; wrote {root / trainer.RESULTS_FILE}", flush=True)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize()
  from spcl_jax.configuration import ConfigError  # pylint: disable=g-import-not-at-top
  from spcl_jax.auc import SingleClassError  # pylint: disable=g-import-not-at-top
  from spcl_jax.train import NonFiniteLossError  # pylint: disable=g-import-not-at-top
  if FLAGS.seeds < 1:
    _fail(f"--seeds={FLAGS.seeds} must be >= 1")
  try:
    config = FLAGS.config
    config.get("model")  # the config file loads lazily: surface a missing/broken file here
  except (OSError, SyntaxError, ImportError, ValueError) as e:
    _fail(f"--config: {' '.join(str(e).split())}")
  try:
    run_seeds(config, FLAGS.workdir, FLAGS.seeds)
  except (ConfigError, NonFiniteLossError, SingleClassError, FileNotFoundError,
          ValueError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
