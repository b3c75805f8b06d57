"""The one training loop every run uses: pre-training, classification and segmentation.

`run(workload, workdir)` gives each run, once and the same way:
  workdir   the resume config check against history.jsonl (`run_info.check_resume` with the
            workload's free fields) before anything is written; one run at a time
            (`workdir_lock`); orbax tmp folders of a killed save removed; config.json and a
            history.jsonl line per start; accelerator time (`accelerator_time`)
  restore   the newest intact checkpoint, a corrupt one moved aside, or `restore_step`
            (`checkpoint.restore_intact`)
  loop      step t's metrics read after step t+1 is dispatched (the accelerator never waits
            for Python); a NaN/Inf loss or gradient stops the run before any checkpoint of that
            state; checkpoints every config.checkpoint_every_steps, at the workload's own save
            points (an epoch end), at the last step and on SIGTERM (`preemption.StopRequest`);
            `checkpoint.save` refuses a non-finite state; a failed save (a full disk) is one
            line naming its step
  metrics   metrics.jsonl rows of steps a resume redoes are dropped, so each step logs once

A workload says what its state, step, eval and "best" are; it never saves, resumes or logs
itself. Its interface (duck-typed; `train.Pretraining`, `finetune.trainer.FineTuningRun`):

  config, total_steps, resume_rules (run_info.ResumeRules), abstract_state, shardings,
  non_finite_advice (what to change when the loss turns NaN)
  open(workdir)                      after the lock: open the train iterator (`data_iterator`)
  run_info_extra() -> dict           what config.json records beyond the config
  init_state() -> TrainState         a fresh state (no checkpoint to resume)
  resumed(state, session)            after restore: drop what the redone steps redo
  train_step(state, step) -> (state, device metrics with 'loss' and 'grad_norm')
  log_row(step, values) -> dict      a metrics row (throughput, epoch...)
  is_save_point(step) -> bool        checkpoint here too (epoch ends)
  before_save(step, state, session)  e.g. val scores and best/ (saved before the checkpoint)
  after_step(step, state, session, last) e.g. the evaluators that are due
  already_done(state, session) -> dict  a start at or past total_steps
  finish(state, session) -> dict     after the last step (e.g. the test split, results.json)
  stopped(state, session) -> dict    after a SIGTERM stop
  close()                            stop the input pipeline's workers
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from spcl_jax import (accelerator_time, background_save_errors, checkpoint, metrics, run_info,
                      workdir_lock)
from spcl_jax.preemption import StopRequest
from spcl_jax.steps import TrainState
from spcl_jax.workdir_path import as_path, check_store_client

# Test hook: called with (moment, step) at the named moments of a run ("train_step",
# "checkpoint_save" while its checkpoint is written, and fine-tuning's "val", "best_save",
# "test"), so a test can stop the run exactly there (as a kill -9 would) instead of by timing.
moment_listeners: list[Callable[[str, int], None]] = []


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


def at_moment(name: str, step: int) -> None:
  for listener in moment_listeners:
    listener(name, step)


@dataclasses.dataclass
class Session:
  """One start of a run in its workdir: what the engine owns and a workload may use."""

  workdir: pathlib.Path
  is_main: bool
  manager: ocp.CheckpointManager
  writer: metrics.MetricsWriter
  clock: accelerator_time.AcceleratorClock
  start_step: int
  last_checkpoint: int | None


def run(workload: Any, workdir: str | pathlib.Path, *, restore_step: int | None = None,
        allow_config_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Trains `workload` in `workdir` (or resumes it); returns the workload's summary."""
  workdir = as_path(workdir)  # a gs:// URL stays a URL (never a local folder 'gs:')
  check_store_client(workdir)
  is_main = jax.process_index() == 0
  # Read-only: a resume that changes a locked field or the model fails before any work.
  changes = (run_info.check_resume(workdir, workload.config, allow_config_changes,
                                   workload.resume_rules) if is_main else [])
  lock = workdir_lock.WorkdirLock(workdir) if is_main else None
  if lock is not None:
    lock.acquire()
  try:
    if is_main:
      checkpoint.remove_stale_tmp(workdir)
    workload.open(workdir)
    clock = accelerator_time.AcceleratorClock.for_this_job(workdir)  # accelerator_time.json
    with background_save_errors.quieted():
      return _run_locked(workload, workdir, restore_step, changes, clock)
  finally:
    workload.close()
    if lock is not None:
      lock.release()


def _restored_or_initial(workload: Any, workdir: pathlib.Path, manager: ocp.CheckpointManager,
                         restore_step: int | None) -> tuple[TrainState, int | None]:
  abstract = workload.abstract_state
  restored = checkpoint.restore_intact(workdir, manager, abstract.params, abstract.opt_state,
                                       workload.data_iterator, restore_step)
  if restored is None:
    return workload.init_state(), None
  params, opt_state, step = restored
  state = TrainState(step=jax.device_put(np.int32(step), workload.shardings.step),
                     params=params, opt_state=opt_state)
  if jax.process_index() == 0:
    print(f"resumed from {checkpoint.checkpoint_dir(workdir)} at step {step}", flush=True)
  return state, step


@dataclasses.dataclass
class _Opened:
  """What a start opens and closes: the checkpoints, the accelerator clock, the metrics."""

  manager: ocp.CheckpointManager
  clock: accelerator_time.AcceleratorClock
  writer: metrics.MetricsWriter | None = None

  def close(self) -> None:
    """Finishes the checkpoint being written, then closes. A full disk fails each of these:
    every one still runs, and the first failure (the save's) is raised."""
    closes = [lambda: checkpoint.wait(self.manager), self.manager.close, self.clock.update]
    if self.writer is not None:
      closes.append(self.writer.close)
    failures = []
    for close in closes:
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except  # each close runs, the first tells
        failures.append(e)
    if failures:
      raise failures[0]


def _run_locked(workload: Any, workdir: pathlib.Path, restore_step: int | None,
                changes: list[dict[str, Any]],
                clock: accelerator_time.AcceleratorClock) -> dict[str, Any]:
  manager = checkpoint.make_manager(workdir, max_to_keep=workload.config.max_checkpoints_to_keep)
  opened = _Opened(manager, clock)
  try:
    summary = _run_opened(workload, workdir, restore_step, changes, opened)
  except BaseException:
    try:
      opened.close()  # also on errors: finish a checkpoint already being written
    except checkpoint.SaveFailedError:
      raise  # a full disk fails every write: the save's line says which checkpoints are intact
    except Exception:  # pylint: disable=broad-except  # else the run's own error tells first
      pass
    raise
  opened.close()
  return summary


def _run_opened(workload: Any, workdir: pathlib.Path, restore_step: int | None,
                changes: list[dict[str, Any]], opened: _Opened) -> dict[str, Any]:
  config, is_main = workload.config, jax.process_index() == 0
  state, last_checkpoint = _restored_or_initial(workload, workdir, opened.manager, restore_step)
  start_step = int(jax.device_get(state.step))
  if is_main:
    run_info.record_start(workdir, config, start_step, changes, last_checkpoint,
                          rules=workload.resume_rules, extra_info=workload.run_info_extra())
  opened.writer = metrics.MetricsWriter(  # drops the rows of steps this run will redo
      workdir, total_steps=workload.total_steps, enabled=is_main,
      first_new_step=0 if last_checkpoint is None else last_checkpoint + 1)
  session = Session(workdir, is_main, opened.manager, opened.writer, opened.clock, start_step,
                    last_checkpoint)
  workload.resumed(state, session)
  if start_step >= workload.total_steps:
    return workload.already_done(state, session)
  state, stopped = _loop(workload, session, state)
  return workload.stopped(state, session) if stopped else workload.finish(state, session)


def _is_checkpoint_step(workload: Any, step: int, stopping: bool) -> bool:
  return (step % workload.config.checkpoint_every_steps == 0 or step == workload.total_steps
          or stopping or workload.is_save_point(step))


def _loop(workload: Any, session: Session, state: TrainState) -> tuple[TrainState, bool]:
  """Steps start_step + 1 .. total_steps; (last state, whether SIGTERM stopped it)."""
  pending: tuple[int, Any] | None = None
  stopping = False
  with StopRequest(agree_every=workload.config.log_every_steps) as stop:
    for step in range(session.start_step + 1, workload.total_steps + 1):
      state, step_metrics = workload.train_step(state, step)
      at_moment("train_step", step)
      if pending is not None:
        record(workload, session, *pending)
      pending = (step, step_metrics)
      stopping = stop.should_stop(step)
      if _is_checkpoint_step(workload, step, stopping):
        record(workload, session, *pending)  # never checkpoint an unchecked state
        pending = None
        workload.before_save(step, state, session)
        checkpoint.save(session.manager, step, state.params, state.opt_state,
                        workload.data_iterator)
        at_moment("checkpoint_save", step)  # the save is being written
        session.last_checkpoint = step
      workload.after_step(step, state, session, step == workload.total_steps)
      if stopping:
        break
    if pending is not None:
      record(workload, session, *pending)
    # Still under the signal handler: a second SIGTERM cannot cut the save short.
    checkpoint.wait(session.manager)
    if stopping:  # every process says so: a preemption that reached one host stopped all
      print(f"stopped at step {session.last_checkpoint}; checkpoint saved, rerun the same "
            "command to resume", flush=True)
  return state, stopping


def check_finite(step: int, values: dict[str, float], session: Session, advice: str) -> None:
  for key in ("loss", "grad_norm"):
    if not np.isfinite(values[key]):
      kept = (f"the last good checkpoint is step {session.last_checkpoint} in "
              f"{checkpoint.checkpoint_dir(session.workdir)}"
              if session.last_checkpoint is not None else "no checkpoint was written")
      raise NonFiniteLossError(
          f"{key} is {values[key]} at step {step}: stopping ({kept}). {advice}")


def record(workload: Any, session: Session, step: int, device_metrics: Any) -> None:
  """Checks a step's loss and gradient; every log_every_steps writes a row of metrics."""
  values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  check_finite(step, values, session, workload.non_finite_advice)
  config = workload.config
  if step % config.log_every_steps == 0 or step == 1 or step == workload.total_steps:
    row = workload.log_row(step, values)
    session.writer.write(step, row)
    session.writer.progress(step, row)
    session.clock.update()  # accelerator time: a run killed without warning loses one interval
