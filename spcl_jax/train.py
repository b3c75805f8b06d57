"""S-PCL pre-training: `train_and_evaluate(config, workdir)`, readable top to bottom.

  validate config -> mesh -> model, optimizer, sharded state -> data iterator -> evaluators
  (config.evals) -> resume from the latest checkpoint in WORKDIR if there is one -> [evaluators
  at step 0] -> loop: global batch, step key = fold_in(train key, step), jitted step, metrics,
  checkpoint, the evaluators that are due -> final checkpoint.

The trainer knows no evaluator by name: `spcl_jax.evaluators` builds those that config.evals
lists and runs the ones due at a step (each on its schedule, and at the first and last step).

Host syncs are lagged by one step: the loop reads step t's metrics after dispatching step t+1,
so the accelerator never waits for Python. A non-finite loss stops the run before any checkpoint
of the bad state is written, and `checkpoint.save` refuses a non-finite updated state.

Run safety: nothing is written to WORKDIR before the config, the data source and the
evaluators are validated; the run holds WORKDIR/lock.json (`workdir_lock`); a resume checks the
recorded config (`run_info.check_resume`), restores the newest intact checkpoint and logs each
step once.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from spcl_jax import (accelerator_time, checkpoint, evaluators, metrics, run_info, sharding,
                      steps, workdir_lock)
from spcl_jax.configuration import ConfigError, resolve_batch_size, validate_config
from spcl_jax.preemption import StopRequest
from spcl_jax.data import pipeline
from spcl_jax.data.sources import open_source
from spcl_jax.workdir_path import as_path, check_store_client

log = logging.getLogger("spcl_jax")


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


def _keys(seed: int) -> dict[str, jax.Array]:
  # Index 2 is the pair-retrieval evaluator's (spcl_jax/evaluators/pair_retrieval.py).
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "train"))}


def _check_finite(step: int, values: dict[str, float], last_checkpoint: int | None,
                  workdir: pathlib.Path) -> None:
  for key in ("loss", "grad_norm"):
    if not np.isfinite(values[key]):
      kept = (f"the last good checkpoint is step {last_checkpoint} in "
              f"{checkpoint.checkpoint_dir(workdir)}" if last_checkpoint is not None
              else "no checkpoint was written")
      raise NonFiniteLossError(
          f"{key} is {values[key]} at step {step}: stopping ({kept}). Lower "
          "config.optim.base_learning_rate, set config.optim.grad_clip_norm, or use "
          "config.model.dtype=float32 to find the cause.")


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


class _TrainLog:
  """Checks every step's loss and gradient; every log_every_steps writes a line of metrics."""

  def __init__(self, config: ml_collections.ConfigDict, writer: metrics.MetricsWriter,
               workdir: pathlib.Path, clock: accelerator_time.AcceleratorClock):
    self.config, self.writer, self.workdir, self.clock = config, writer, workdir, clock
    self.throughput = _Throughput(config)
    self.last: dict[str, Any] = {}

  def record(self, step: int, device_metrics: dict[str, jax.Array],
             last_checkpoint: int | None) -> None:
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step, values, last_checkpoint, self.workdir)
    if step % self.config.log_every_steps == 0 or step == 1 or step == self.config.total_steps:
      self.last = {**values, **self.throughput.measure(step)}
      self.writer.write(step, self.last)
      self.writer.progress(step, self.last)
      self.clock.update()  # accelerator time: a run killed without warning loses one interval


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restore_step: int | None = None,
                       allow_config_changes: tuple[str, ...] | list[str] = ()
                       ) -> dict[str, Any]:
  """Pre-trains (or resumes) in `workdir`; returns the last train and eval metrics.

  `restore_step` resumes from that checkpoint instead of the newest intact one;
  `allow_config_changes` names locked config fields this resume may change (run_info.LOCKED).
  """
  workdir = as_path(workdir)  # a gs:// URL stays a URL (never a local folder 'gs:')
  check_store_client(workdir)
  is_main = jax.process_index() == 0
  mesh, config = _validated_mesh(config)
  # Read-only: a resume that changes a locked field or the model fails before any work.
  changes = run_info.check_resume(workdir, config, allow_config_changes) if is_main else []
  source = _validated_source(config)
  if is_main:
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in "
          f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; workdir {workdir}",
          flush=True)
    num_batch_shards = sharding.num_batch_shards(config, mesh)
    print(f"global batch {config.batch_size} = {config.batch_size // num_batch_shards} per "
          f"device x {num_batch_shards} devices, in {config.grad_accum_steps} micro-batch(es) "
          f"per device ({config.accumulation} accumulation)", flush=True)
  training = steps.build_training(config, mesh)
  evals = evaluators.Evaluators(config, training)  # checks config.evals and their data
  # Validated: from here on the workdir is written, by one run at a time.
  lock = workdir_lock.WorkdirLock(workdir) if is_main else None
  if lock is not None:
    lock.acquire()
  try:
    if is_main:
      checkpoint.remove_stale_tmp(workdir)
      evals.write_image_lists(workdir)
    clock = accelerator_time.AcceleratorClock.for_this_job(workdir)  # accelerator_time.json
    return _train(config, workdir, training, source, evals, restore_step, changes, clock)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, training: steps.Training,
           source: Any, evals: evaluators.Evaluators, restore_step: int | None,
           changes: list[dict[str, Any]],
           clock: accelerator_time.AcceleratorClock) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  mesh = training.mesh
  abstract_state, shardings = training.abstract_state, training.shardings
  keys = _keys(config.seed)
  train_iter = iter(pipeline.train_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      source=source))

  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  restored = checkpoint.restore_intact(workdir, manager, abstract_state.params,
                                       abstract_state.opt_state, train_iter, restore_step)
  last_checkpoint = None if restored is None else restored[2]
  if restored is not None:
    params, opt_state, step = restored
    state = steps.TrainState(step=jax.device_put(np.int32(step), shardings.step),
                             params=params, opt_state=opt_state)
    if is_main:
      print(f"resumed from {checkpoint.checkpoint_dir(workdir)} at step {step}", flush=True)
  else:
    state = training.init_state(keys["init"])
  start_step = int(jax.device_get(state.step))
  if is_main:
    run_info.record_start(workdir, config, start_step, changes, last_checkpoint)
  if start_step >= config.total_steps and is_main:
    print(f"nothing to do: the run in {workdir} is at step {start_step} and "
          f"config.total_steps={config.total_steps}; raise it to train further", flush=True)

  train_step = training.train_step
  writer = metrics.MetricsWriter(  # drops the rows of steps this run will redo
      workdir, total_steps=config.total_steps, enabled=is_main,
      first_new_step=0 if last_checkpoint is None else last_checkpoint + 1)
  train_log = _TrainLog(config, writer, workdir, clock)
  last_eval: dict[str, float] = {}

  try:
    if start_step == 0:
      last_eval.update(_run_evaluators(evals, writer, 0, state.params, first=True))
    pending: tuple[int, dict[str, jax.Array]] | None = None
    with StopRequest(agree_every=config.log_every_steps) as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        images = steps.global_batch(pipeline.as_numpy_batch(next(train_iter)), mesh, config)
        step_key = jax.random.fold_in(keys["train"], step - 1)
        state, step_metrics = train_step(state, images, step_key)
        if pending is not None:
          train_log.record(*pending, last_checkpoint)
        pending = (step, step_metrics)
        is_last = step == config.total_steps
        stopping = stop.should_stop(step)
        if step % config.checkpoint_every_steps == 0 or is_last or stopping:
          train_log.record(*pending, last_checkpoint)  # never checkpoint an unchecked state
          pending = None
          checkpoint.save(manager, step, state.params, state.opt_state, train_iter)
          last_checkpoint = step
        last_eval.update(_run_evaluators(evals, writer, step, state.params, last=is_last))
        if stopping:
          break
      if pending is not None:
        train_log.record(*pending, last_checkpoint)
      final_step = int(jax.device_get(state.step))
      if last_checkpoint != final_step:
        checkpoint.save(manager, final_step, state.params, state.opt_state, train_iter)
        last_checkpoint = final_step
      # Still under the signal handler: a second SIGTERM cannot cut the save short.
      manager.wait_until_finished()
      if stop.requested:
        print(f"stopped at step {last_checkpoint}; checkpoint saved, rerun the same command to "
              "resume", flush=True)
  finally:
    # Also on errors: finish a checkpoint already being written, stop grain's workers.
    manager.wait_until_finished()
    manager.close()
    clock.update()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return {**train_log.last, **last_eval, "step": int(jax.device_get(state.step))}
