"""S-PCL pre-training: `train_and_evaluate(config, workdir)`, readable top to bottom.

  validate config -> mesh -> model, optimizer, sharded state -> data iterator -> resume from the
  latest checkpoint in WORKDIR if there is one -> [eval at step 0] -> loop: global batch, step
  key = fold_in(train key, step), jitted step, metrics, eval, checkpoint -> final checkpoint and
  eval.

Host syncs are lagged by one step: the loop reads step t's metrics after dispatching step t+1,
so the accelerator never waits for Python. A non-finite loss stops the run before any checkpoint
of the bad state is written.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metrics as clu_metrics

from spcl_jax import accelerator_time, checkpoint, metrics, run_info, sharding, steps
from spcl_jax.preemption import StopRequest
from spcl_jax.configuration import validate_config
from spcl_jax.data import pipeline
from spcl_jax.data.sources import open_source

log = logging.getLogger("spcl_jax")


# Means over equal-sized eval batches (clu.metrics; clu's writers would import TensorFlow).
# Built with create(): this module's postponed annotations would hide field types from clu.
EvalMetrics = clu_metrics.Collection.create(
    eval_loss=clu_metrics.Average.from_output("loss"),
    eval_retrieval_top1=clu_metrics.Average.from_output("retrieval"))


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


def _keys(seed: int) -> dict[str, jax.Array]:
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i)
          for i, name in enumerate(("init", "train", "eval"))}


def _evaluate(eval_step, params, eval_ds, eval_key, mesh, config) -> dict[str, float]:
  """Loss and pair retrieval on fixed images with fixed partitions from the eval key.

  The eval key is separate from the train key, so these partitions are never trained on; it is
  the same at every evaluation, so the numbers are comparable across steps.
  """
  totals = None
  for i in range(len(eval_ds)):
    images = steps.global_batch(pipeline.as_numpy_batch(eval_ds[i]), mesh, config)
    loss, retrieval = eval_step(params, images, jax.random.fold_in(eval_key, i))
    batch = EvalMetrics.single_from_model_output(loss=loss, retrieval=retrieval)
    totals = batch if totals is None else totals.merge(batch)
  return {k: float(v) for k, v in totals.compute().items()}


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
    self.flops_per_image = metrics.train_flops_per_image(config)
    self.peak = metrics.peak_flops_per_device(config, jax.devices()[0])
    self.batch_size = config.batch_size
    self._last: tuple[int, float] | None = None

  def measure(self, step: int) -> dict[str, float | None]:
    now = time.perf_counter()
    last, self._last = self._last, (step, now)
    if last is None or step == last[0]:
      return {"images_per_sec": None, "tflops_per_sec": None, "mfu": None}
    images_per_sec = (step - last[0]) * self.batch_size / (now - last[1])
    flops = images_per_sec * self.flops_per_image
    mfu = flops / (self.peak * jax.device_count()) if self.peak else None
    return {"images_per_sec": images_per_sec, "tflops_per_sec": flops / 1e12, "mfu": mfu}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) in `workdir`; returns the last train and eval metrics."""
  workdir = pathlib.Path(workdir).expanduser().resolve()
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config)
  validate_config(config, num_batch_shards=sharding.num_batch_shards(config, mesh),
                  process_count=jax.process_count())
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    run_info.write_run_info(workdir, config)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in "
          f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; workdir {workdir}",
          flush=True)
  clock = accelerator_time.AcceleratorClock.for_this_job(workdir)  # accelerator_time.json

  training = steps.build_training(config, mesh)
  abstract_state, shardings = training.abstract_state, training.shardings
  keys = _keys(config.seed)

  source = open_source(config.data.source)
  if len(source) < config.batch_size:
    log.warning("%s has %d images, fewer than batch_size=%d: batches repeat images, and a "
                "repeated image is a false negative", source, len(source), config.batch_size)
  train_iter = iter(pipeline.train_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      source=source))
  eval_ds = pipeline.eval_dataset(config, process_index=jax.process_index(),
                                  process_count=jax.process_count(), source=source)

  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  last_checkpoint = manager.latest_step()
  if last_checkpoint is not None:
    params, opt_state, step = checkpoint.restore(
        manager, last_checkpoint, abstract_state.params, abstract_state.opt_state, train_iter)
    state = steps.TrainState(step=jax.device_put(np.int32(step), shardings.step),
                             params=params, opt_state=opt_state)
    if is_main:
      print(f"resumed from {checkpoint.checkpoint_dir(workdir)} at step {step}", flush=True)
  else:
    state = training.init_state(keys["init"])
  start_step = int(jax.device_get(state.step))
  if start_step >= config.total_steps and is_main:
    print(f"nothing to do: the run in {workdir} is at step {start_step} and "
          f"config.total_steps={config.total_steps}; raise it to train further", flush=True)

  train_step, eval_step = training.train_step, training.eval_step
  writer = metrics.MetricsWriter(workdir, total_steps=config.total_steps, enabled=is_main)
  throughput = _Throughput(config)
  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] = {}

  def run_eval(step: int) -> None:
    nonlocal last_eval
    last_eval = _evaluate(eval_step, state.params, eval_ds, keys["eval"], mesh, config)
    writer.write(step, last_eval)
    writer.progress(step, last_eval)

  def record_train(step: int, device_metrics: dict[str, jax.Array]) -> None:
    nonlocal last_train
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step, values, last_checkpoint, workdir)
    if step % config.log_every_steps == 0 or step == 1 or step == config.total_steps:
      last_train = {**values, **throughput.measure(step)}
      writer.write(step, last_train)
      writer.progress(step, last_train)
      clock.update()

  def save(step: int) -> None:
    nonlocal last_checkpoint
    checkpoint.save(manager, step, state.params, state.opt_state, train_iter)
    last_checkpoint = step

  try:
    if start_step == 0:
      run_eval(0)
    pending: tuple[int, dict[str, jax.Array]] | None = None
    with StopRequest(agree_every=config.log_every_steps) as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        images = steps.global_batch(pipeline.as_numpy_batch(next(train_iter)), mesh, config)
        step_key = jax.random.fold_in(keys["train"], step - 1)
        state, step_metrics = train_step(state, images, step_key)
        if pending is not None:
          record_train(*pending)
        pending = (step, step_metrics)
        is_last = step == config.total_steps
        stopping = stop.should_stop(step)
        if step % config.checkpoint_every_steps == 0 or is_last or stopping:
          record_train(*pending)  # never checkpoint a state whose loss was not checked
          pending = None
          save(step)
        if step % config.eval_every_steps == 0 or is_last:
          run_eval(step)
        if stopping:
          print(f"stopped at step {step}; checkpoint saved, rerun the same command to resume",
                flush=True)
          break
      if pending is not None:
        record_train(*pending)
    if last_checkpoint != int(jax.device_get(state.step)):
      save(int(jax.device_get(state.step)))
  finally:
    # Also on errors: finish a checkpoint already being written, stop grain's workers.
    manager.wait_until_finished()
    manager.close()
    clock.update()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return {**last_train, **last_eval, "step": int(jax.device_get(state.step))}
