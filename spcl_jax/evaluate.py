"""Runs the evaluators of config.evals on a checkpoint of a finished (or running) workdir.

  python -m spcl_jax.evaluate --workdir W [--step S | --all_steps] [--only probe,knn] \
      [--config.evals.probe.C=0.1 --config.evals.knn.pooling=mean_patch ...]

The config is the run's own (W/config.json): the same model, preprocessing and mesh rules.
`--config.evals.NAME.FIELD=VALUE` changes an evaluator's field, or adds an evaluator when NAME is
new (give at least its `type`); nothing outside config.evals can be changed. Results
are appended to W/evaluations.jsonl, one line per checkpoint: {"step", METRIC: value, ...},
beside the run's metrics.jsonl (which holds the evaluations made during training).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging as absl_logging

from spcl_jax import cli_errors, errors

RESULTS_FILE = "evaluations.jsonl"


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config from W/config.json (errors name the file)."""
  from spcl_jax.run_info import read_run_info  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(read_run_info(workdir)["config"])


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
  """(the options, the --config.PATH=VALUE overrides in order)."""
  parser = cli_errors.ArgumentParser(
      prog="python -m spcl_jax.evaluate",
      description="Run config.evals on a checkpoint of a pre-training workdir.",
      epilog="--config.evals.NAME.FIELD=VALUE changes (or adds) an evaluator's field.")
  parser.add_argument("--workdir", required=True, help="the pre-training workdir")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  which.add_argument("--all_steps", action="store_true", help="every checkpoint in the workdir")
  parser.add_argument("--only", default="", help="comma-separated evaluator names (default: all)")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for arg in rest:
    path, sep, value = arg.partition("=")
    if not path.startswith("--config.") or not sep:
      parser.error(f"unrecognised argument {arg!r} (overrides are --config.evals.NAME.FIELD=V)")
    overrides.append((path.removeprefix("--config."), value))
  return args, overrides


def _parse_value(text: str, current: Any) -> Any:
  """VALUE as the type of the field it replaces; for a new field, a Python literal or text."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a boolean")
    return text.lower() in ("true", "1")
  if isinstance(current, (int, float)):
    return type(current)(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> None:
  """config.evals.NAME.FIELD = VALUE, a new NAME adding an evaluator; nothing else may change
  (the model, data and preprocessing are the run's)."""
  for path, text in overrides:
    parts = path.split(".")
    if parts[0] != "evals" or len(parts) != 3:
      raise errors.UsageError(
          f"--config.{path}: only config.evals.NAME.FIELD can be set here; the "
                       "model, data and preprocessing are the run's (start a new run to change "
                       "them)")
    _, name, field = parts
    if name not in config.evals:  # a new evaluator; here it runs once per checkpoint anyway
      config.evals[name] = ml_collections.ConfigDict({"every_steps": 1})
    entry = config.evals[name]
    try:
      entry[field] = _parse_value(text, entry[field] if field in entry else None)
    except (TypeError, ValueError) as e:
      raise errors.UsageError(f"--config.{path}={text}: {e}") from None


def evaluate(workdir: str, config: ml_collections.ConfigDict, steps: Sequence[int] | None,
             only: Sequence[str] = ()) -> list[dict[str, float]]:
  """Runs the evaluators on each checkpoint step (None: the latest); appends the results."""
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import checkpoint, evaluators, sharding  # pylint: disable=g-import-not-at-top
  from spcl_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from spcl_jax.configuration import validate_config  # pylint: disable=g-import-not-at-top

  # The attention kernel is a speed setting, not part of what was trained: a run made with
  # 'cudnn' on a GPU is evaluated with this machine's kernel.
  config.model.attention_impl = "auto"
  mesh = sharding.make_mesh(config)
  validate_config(config, num_batch_shards=sharding.num_batch_shards(config, mesh),
                  process_count=jax.process_count())
  training = steps_lib.build_training(config, mesh)
  evals = evaluators.Evaluators(config, training, workdir=None, only=tuple(only))
  if not evals.scheduled:
    raise ValueError(f"config.evals of {workdir!r} lists no evaluator: add one with "
                     "--config.evals.NAME.type=TYPE")
  records = []
  for step in steps or [None]:
    params, step = checkpoint.restore_params(workdir, step)
    params = jax.device_put(params, training.shardings.params)
    results = evals.run_due(step, params, first=True)
    record = {"step": step, **results}
    records.append(record)
    if jax.process_index() == 0:
      with open(pathlib.Path(workdir) / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
      shown = evaluators.headline_keys(results)
      print(f"step {step}: " + " | ".join(f"{k} {results[k]:.4g}" for k in shown), flush=True)
  return records


def main(argv: Sequence[str] | None = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file at INFO
  from spcl_jax import checkpoint  # pylint: disable=g-import-not-at-top

  def run() -> int:
    config = run_config(args.workdir)
    apply_overrides(config, overrides)
    steps = checkpoint.available_steps(args.workdir) if args.all_steps else [args.step]
    only = tuple(name for name in args.only.split(",") if name)
    evaluate(args.workdir, config, steps, only)
    return 0
  # One `error:` line naming the file or field, not a traceback (spcl_jax.cli_errors).
  return cli_errors.run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
