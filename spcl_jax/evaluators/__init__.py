"""Evaluators: plug-ins that run on the parameters of a pre-training run when they are due.

`config.evals` maps a name to `{type, every_steps, ...}`. `type` is a registered evaluator: the
built-ins are this package's modules (`pair_retrieval`, `linear_probe`, `knn`); anything else
plugs in with `register(type, factory)` and needs no change to the trainer. An evaluator is built
once per run as `factory(name, eval_config, training)` (`training`: `steps.Training`, i.e. the
model, mesh, shardings and run config) and has

  run(params) -> {metric: float}   params = {'encoder': ..., 'log_scale': ...}, as trained
  images() -> {split: [names]}     which images it reads (logged, and written to the workdir)

Its metrics are logged as PREFIX + metric; PREFIX is `eval_config.prefix`, default "NAME_". An
evaluator runs when the step is a multiple of its `every_steps`, and always at the first step of
a fresh run (step 0) and at the last step.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from spcl_jax.errors import ConfigError
from spcl_jax.workdir_path import as_path

BUILT_IN = ("pair_retrieval", "linear_probe", "knn")
_REGISTRY: dict[str, Callable[..., Any]] = {}


class EvalConfigError(ConfigError):
  """An entry of config.evals is wrong; the message names the field."""


def register(type_name: str, factory: Callable[..., Any]) -> None:
  """Makes `type_name` usable in config.evals; `factory(name, eval_config, training)`."""
  if type_name in BUILT_IN:
    raise ValueError(f"evaluator type {type_name!r} is built in")
  _REGISTRY[type_name] = factory


def known_types() -> list[str]:
  return sorted({*BUILT_IN, *_REGISTRY})


def factory_of(type_name: str) -> Callable[..., Any]:
  if type_name in _REGISTRY:
    return _REGISTRY[type_name]
  if type_name in BUILT_IN:  # imported lazily: scikit-learn only when a probe is configured
    return importlib.import_module(f"{__name__}.{type_name}").Evaluator
  raise EvalConfigError(f"unknown evaluator type {type_name!r}; known: {', '.join(known_types())}")


def check_eval_configs(evals: ml_collections.ConfigDict) -> None:
  """The fields every evaluator has; each evaluator checks its own when it is built."""
  for name, entry in evals.items():
    where = f"config.evals.{name}"
    if not isinstance(entry, (dict, ml_collections.ConfigDict)) or "type" not in entry:
      raise EvalConfigError(f"{where} must be a dict with a 'type' (one of "
                            f"{', '.join(known_types())})")
    if entry["type"] not in known_types():
      raise EvalConfigError(f"{where}.type={entry['type']!r} is not an evaluator; known: "
                            f"{', '.join(known_types())}")
    every = entry.get("every_steps")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise EvalConfigError(f"{where}.every_steps={every!r} must be a positive integer")


COMMON_FIELDS = ("type", "every_steps", "prefix")


def _check_fields(name: str, entry: Any, factory: Any) -> None:
  """A misspelt field would silently take its default: refuse fields the evaluator lacks."""
  own = getattr(factory, "FIELDS", None)
  if own is None:  # a plug-in that does not declare its fields checks them itself
    return
  unknown = sorted(set(entry.keys()) - {*COMMON_FIELDS, *own})
  if unknown:
    raise EvalConfigError(f"config.evals.{name}: unknown field(s) {', '.join(unknown)} for type "
                          f"{entry['type']!r}; its fields: {', '.join((*COMMON_FIELDS, *own))}")


def field(eval_config: Any, name: str, default: Any) -> Any:
  """eval_config[name] with a default (ConfigDict and plain dict alike)."""
  return eval_config[name] if name in eval_config else default


def headline_keys(results: dict[str, Any]) -> list[str]:
  """The metrics worth a progress line: not per class ('auc/CLASS') and not timings."""
  return [k for k in results if "/" not in k and not k.endswith("seconds")]


@dataclasses.dataclass
class Scheduled:
  name: str
  every_steps: int
  prefix: str
  evaluator: Any

  def is_due(self, step: int, *, first: bool, last: bool) -> bool:
    return first or last or step % self.every_steps == 0


class Evaluators:
  """Every evaluator of config.evals, built once; `run_due` runs those due at a step."""

  def __init__(self, config: ml_collections.ConfigDict, training: Any,
               workdir: str | pathlib.Path | None = None, only: tuple[str, ...] = ()):
    evals = config.get("evals") or ml_collections.ConfigDict()
    check_eval_configs(evals)
    missing = [n for n in only if n not in evals]
    if missing:
      raise EvalConfigError(f"no evaluator named {missing} in config.evals ({', '.join(evals)})")
    self.is_main = jax.process_index() == 0
    self.scheduled: list[Scheduled] = []
    for name, entry in evals.items():
      if only and name not in only:
        continue
      factory = factory_of(entry["type"])
      _check_fields(name, entry, factory)
      evaluator = factory(name, entry, training)
      self.scheduled.append(Scheduled(name, int(entry["every_steps"]),
                                      str(field(entry, "prefix", f"{name}_")), evaluator))
    self._report_images(workdir)

  def _report_images(self, workdir: str | pathlib.Path | None) -> None:
    """One line per evaluator on what it reads; the full name lists to WORKDIR/eval_images.json."""
    if not self.is_main or not self.scheduled:
      return
    for s in self.scheduled:
      counts = ", ".join(f"{split} {len(names)}" for split, names in s.evaluator.images().items())
      print(f"eval {s.name!r} ({type(s.evaluator).__module__.rsplit('.', 1)[-1]}, every "
            f"{s.every_steps} steps): {s.evaluator.description} [images: {counts}]", flush=True)
    if workdir is not None:
      self.write_image_lists(workdir)

  def write_image_lists(self, workdir: str | pathlib.Path) -> None:
    """WORKDIR/eval_images.json (the trainer calls it once it holds the workdir's lock)."""
    if not self.is_main or not self.scheduled:
      return
    listing = {s.name: s.evaluator.images() for s in self.scheduled}
    path = as_path(workdir) / "eval_images.json"
    path.write_text(json.dumps(listing, indent=1) + "\n")

  def run_due(self, step: int, params: Any, *, first: bool = False,
              last: bool = False) -> dict[str, float]:
    """The prefixed metrics of every evaluator due at `step` ({} when none is)."""
    results: dict[str, float] = {}
    for s in self.scheduled:
      if s.is_due(step, first=first, last=last):
        start = time.perf_counter()
        metrics = s.evaluator.run(params)
        results.update({f"{s.prefix}{k}": float(v) for k, v in metrics.items()})
        results[f"{s.prefix}seconds"] = time.perf_counter() - start
    return results
