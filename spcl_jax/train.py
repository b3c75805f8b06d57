"""S-PCL pre-training: `train_and_evaluate(config, workdir)`, readable top to bottom.

  validate config -> mesh -> model, optimizer, sharded state -> data iterator -> evaluators
  (config.evals) -> resume from the latest checkpoint in WORKDIR if there is one -> [evaluators
  at step 0] -> loop: global batch, step key = fold_in(train key, step), jitted step, metrics,
  checkpoint, the evaluators that are due -> final checkpoint.

The trainer knows no evaluator by name: `spcl_jax.evaluators` builds those that config.evals
lists and runs the ones due at a step (each on its schedule, and at the first and last step).

The loop, checkpoints, resume and every run-safety protection are the engine's (`engine`):
`Pretraining` is the workload it runs (S-PCL's state, step and evaluators). Nothing is written
to WORKDIR before the config, the data source and the evaluators are validated.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from spcl_jax import engine, evaluators, metrics, run_info, sharding, steps
from spcl_jax.configuration import ConfigError, resolve_batch_size, validate_config
from spcl_jax.data import pipeline
from spcl_jax.data.sources import open_source
from spcl_jax.engine import NonFiniteLossError  # noqa: F401  (raised by the engine's loop)
from spcl_jax.workdir_path import as_path

log = logging.getLogger("spcl_jax")


def _keys(seed: int) -> dict[str, jax.Array]:
  # Index 2 is the pair-retrieval evaluator's (spcl_jax/evaluators/pair_retrieval.py).
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "train"))}


class _Throughput:
  """images/s, TFLOP/s and MFU between two log points (the first one includes compilation)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._last: tuple[int, float] | None = None

  def measure(self, step: int) -> dict[str, float | None]:
    now = time.perf_counter()
    last, self._last = self._last, (step, now)
    if last is None or step == last[0]:
      return {"images_per_sec": None, "tflops_per_sec": None, "mfu": None}
    return metrics.throughput(self.config, (step - last[0]) * self.config.batch_size,
                              now - last[1])


def _run_evaluators(evals: evaluators.Evaluators, writer: metrics.MetricsWriter, step: int,
                    params: Any, *, first: bool = False, last: bool = False) -> dict[str, float]:
  results = evals.run_due(step, params, first=first, last=last)
  if results:
    writer.write(step, results)
    writer.progress(step, results, extra_keys=evaluators.headline_keys(results))
  return results


def _validated_mesh(config: ml_collections.ConfigDict
                    ) -> tuple[jax.sharding.Mesh, ml_collections.ConfigDict]:
  """(mesh, config with batch_size resolved for this device count), both checked."""
  try:
    mesh = sharding.make_mesh(config)
  except ValueError as e:  # e.g. sharding.fsdp not dividing the devices
    raise ConfigError(str(e)) from None
  num_batch_shards = sharding.num_batch_shards(config, mesh)
  config = resolve_batch_size(config, num_batch_shards)  # the device count is known by now
  validate_config(config, num_batch_shards=num_batch_shards, process_count=jax.process_count())
  return mesh, config


def _validated_source(config: ml_collections.ConfigDict) -> Any:
  """The training images; a missing or empty folder is a config error naming it."""
  try:
    source = open_source(config.data.source)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if len(source) < config.batch_size:
    log.warning("%s has %d images, fewer than batch_size=%d: batches repeat images, and a "
                "repeated image is a false negative", source, len(source), config.batch_size)
  return source


class Pretraining:
  """S-PCL pre-training as an `engine` workload: the state, the step, the evaluators."""

  resume_rules = run_info.PRETRAINING
  non_finite_advice = ("Lower config.optim.base_learning_rate, set config.optim.grad_clip_norm, "
                       "or use config.model.dtype=float32 to find the cause.")

  def __init__(self, config: ml_collections.ConfigDict, training: steps.Training, source: Any,
               evals: evaluators.Evaluators):
    self.config, self.training, self.source, self.evals = config, training, source, evals
    self.total_steps = config.total_steps
    self.abstract_state, self.shardings = training.abstract_state, training.shardings
    self.keys = _keys(config.seed)
    self.throughput = _Throughput(config)
    self.data_iterator: Any = None
    self.last_train: dict[str, Any] = {}
    self.last_eval: dict[str, float] = {}

  def open(self, workdir: pathlib.Path) -> None:
    if jax.process_index() == 0:
      self.evals.write_image_lists(workdir)
    self.data_iterator = iter(pipeline.train_dataset(
        self.config, process_index=jax.process_index(), process_count=jax.process_count(),
        source=self.source))

  def run_info_extra(self) -> dict[str, Any]:
    return {}

  def init_state(self) -> steps.TrainState:
    return self.training.init_state(self.keys["init"])

  def resumed(self, state: steps.TrainState, session: engine.Session) -> None:
    if session.start_step == 0:
      self._evaluate(session, 0, state.params, first=True)

  def train_step(self, state: steps.TrainState, step: int) -> tuple[steps.TrainState, Any]:
    images = steps.global_batch(pipeline.as_numpy_batch(next(self.data_iterator)),
                                self.training.mesh, self.config)
    return self.training.train_step(state, images, jax.random.fold_in(self.keys["train"],
                                                                      step - 1))

  def log_row(self, step: int, values: dict[str, float]) -> dict[str, Any]:
    self.last_train = {**values, **self.throughput.measure(step)}
    return self.last_train

  def is_save_point(self, step: int) -> bool:
    del step
    return False

  def before_save(self, step: int, state: steps.TrainState, session: engine.Session) -> None:
    del step, state, session

  def after_step(self, step: int, state: steps.TrainState, session: engine.Session,
                 last: bool) -> None:
    self._evaluate(session, step, state.params, last=last)

  def _evaluate(self, session: engine.Session, step: int, params: Any, *, first: bool = False,
                last: bool = False) -> None:
    self.last_eval.update(_run_evaluators(self.evals, session.writer, step, params,
                                          first=first, last=last))

  def already_done(self, state: steps.TrainState, session: engine.Session) -> dict[str, Any]:
    if session.is_main:
      print(f"nothing to do: the run in {session.workdir} is at step {session.start_step} and "
            f"config.total_steps={self.total_steps}; raise it to train further", flush=True)
    return self.finish(state, session)

  def finish(self, state: steps.TrainState, session: engine.Session) -> dict[str, Any]:
    del session
    return {**self.last_train, **self.last_eval, "step": int(jax.device_get(state.step))}

  stopped = finish

  def close(self) -> None:
    if hasattr(self.data_iterator, "close"):
      self.data_iterator.close()  # stops grain's workers


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restore_step: int | None = None,
                       allow_config_changes: tuple[str, ...] | list[str] = ()
                       ) -> dict[str, Any]:
  """Pre-trains (or resumes) in `workdir`; returns the last train and eval metrics.

  `restore_step` resumes from that checkpoint instead of the newest intact one;
  `allow_config_changes` names locked config fields this resume may change (run_info.LOCKED).
  """
  workdir = as_path(workdir)  # a gs:// URL stays a URL (never a local folder 'gs:')
  mesh, config = _validated_mesh(config)
  if jax.process_index() == 0:  # read-only, and cheap: refuse a bad resume before building
    run_info.check_resume(workdir, config, allow_config_changes)
  source = _validated_source(config)
  if jax.process_index() == 0:
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in "
          f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; workdir {workdir}",
          flush=True)
    num_batch_shards = sharding.num_batch_shards(config, mesh)
    print(f"global batch {config.batch_size} = {config.batch_size // num_batch_shards} per "
          f"device x {num_batch_shards} devices, in {config.grad_accum_steps} micro-batch(es) "
          f"per device ({config.accumulation} accumulation)", flush=True)
  training = steps.build_training(config, mesh)
  evals = evaluators.Evaluators(config, training)  # checks config.evals and their data
  return engine.run(Pretraining(config, training, source, evals), workdir,
                    restore_step=restore_step, allow_config_changes=allow_config_changes)
