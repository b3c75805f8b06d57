"""Checkpoints in WORKDIR/checkpoints, one orbax step folder per save, four separate items:

  params     {'encoder': ViT params (big_vision names), 'log_scale': scalar}
  opt_state  the optax state
  data       the grain iterator state, one JSON file per process (grain's own handler)
  meta       {'step': int, 'layout_version': int}

Separate items let export and feature extraction restore `params` alone, without building the
optimizer or the input pipeline.

Safety: a state with a NaN/Inf anywhere in the parameters or optimiser state is never written
(checked on device just before the save). A save that fails (a full disk) is one line naming
the step, `SaveFailedError` (`background_save_errors` keeps the tracebacks of its writes out
of the output). On restore, a checkpoint that cannot be read, or that holds a
non-finite value, is named with what is wrong and moved to WORKDIR/checkpoints_corrupt/,
and the newest intact one is used instead. orbax tmp folders left by a killed save are removed.

A fine-tuning run also keeps its best-on-val parameters in WORKDIR/best/ (params and meta only;
the newest best and the one before it): `save_best`, `restore_best`, `drop_best_after`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys
import time
import weakref
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils.epath import backend as epath_backend
from jax.experimental import multihost_utils

from spcl_jax.workdir_path import as_path, is_url

LAYOUT_VERSION = 1
ITEM_NAMES = ("params", "opt_state", "data", "meta")
# Where unreadable checkpoints and those after a chosen --restore_step are moved (never deleted).
CORRUPT_DIR = "checkpoints_corrupt"
SUPERSEDED_DIR = "checkpoints_superseded"
BEST_DIR = "best"
TMP_MARKER = ".orbax-checkpoint-tmp"


class NonFiniteStateError(FloatingPointError):
  """The parameters or optimiser state hold NaN/Inf: the state is not written."""


class CorruptCheckpointError(ValueError):
  """A checkpoint that cannot be restored (unreadable, incomplete, or not finite)."""


class SaveFailedError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""


# The step of the last save each manager started: an asynchronous save fails later, in a wait.
_saving: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_OS_ERROR = re.compile(r"os_error_code='(\d+)'")


def _save_failed(manager: ocp.CheckpointManager, error: BaseException) -> SaveFailedError:
  code = _OS_ERROR.search(str(error))
  why = os.strerror(int(code.group(1))) if code else _what_is_wrong(error)
  step = _saving.get(manager)
  return SaveFailedError(
      f"saving checkpoint step {step if step is not None else '?'} in "
      f"{str(manager.directory)!r} failed: {why}; the checkpoints before it are intact (the "
      "next start removes the half-written folder)")


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the manager's saves; a failed one is a SaveFailedError naming its step."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
    raise _save_failed(manager, e) from None


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """One on-device reduction: True iff every floating-point leaf of `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def first_non_finite(tree: Any) -> str | None:
  """The path of the first leaf holding NaN/Inf (host arrays), for the error message."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
      return jax.tree_util.keystr(path)
  return None


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """WORKDIR/checkpoints; a gs:// workdir stays a URL (orbax writes it through tensorstore)."""
  return as_path(workdir) / "checkpoints"


def make_manager(workdir: str | pathlib.Path, *, max_to_keep: int | None = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      # Async: the train loop goes on while the arrays are written; `wait` before exit.
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=ITEM_NAMES,
      item_handlers={"data": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         data_iterator: Any) -> None:
  """Starts an asynchronous save; refuses a non-finite state (it would poison every resume).

  The finiteness check is one jitted reduction over the updated state, read here only, so
  steps that are not saved never wait for it.
  """
  if not bool(all_finite((params, opt_state))):
    kept = manager.latest_step()
    raise NonFiniteStateError(
        f"the parameters or optimiser state after step {step} hold NaN/Inf: not saved "
        + (f"(the last good checkpoint is step {kept} in {manager.directory})" if kept is not None
           else "(no checkpoint was written)")
        + ". Lower config.optim.learning_rate, set config.optim.grad_clip_norm, or use "
        "config.model.dtype=float32 to find the cause")
  wait(manager)  # a failure of the previous (asynchronous) save is named with its step
  _saving[manager] = int(step)
  try:
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave({"step": int(step), "layout_version": LAYOUT_VERSION})),
        force=True)
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
    raise _save_failed(manager, e) from None


def restore(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Any, data_iterator: Any) -> tuple[Any, Any, int]:
  """Restores onto the given abstract trees (their shardings place the arrays directly)."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
      meta=ocp.args.JsonRestore()))
  meta = restored["meta"]
  if meta.get("layout_version") != LAYOUT_VERSION:
    raise ValueError(f"checkpoint step {step} in {manager.directory} has layout version "
                     f"{meta.get('layout_version')}, this code reads {LAYOUT_VERSION}")
  return restored["params"], restored["opt_state"], int(meta["step"])


def _what_is_wrong(error: BaseException) -> str:
  text = " ".join(str(error).split())
  text = text.split(" See full TensorStore details")[0]  # then a page of driver spec
  return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _files_under(folder: Any) -> list[Any]:
  """Every file below `folder`, by listing (epath has no recursive glob on object stores)."""
  files = []
  if not folder.is_dir():
    return files
  for child in folder.iterdir():
    if child.is_dir():
      files.extend(_files_under(child))
    else:
      files.append(child)
  return files


def _check_json_files(step_dir: pathlib.Path) -> None:
  """orbax reports a cut-short JSON file as a bare JSONDecodeError: name the file instead."""
  for path in sorted(_files_under(step_dir), key=str):
    if path.suffix == ".json" or path.name in ("metadata", "_CHECKPOINT_METADATA", "_METADATA"):
      try:
        json.loads(path.read_bytes())
      except ValueError as e:
        inside = str(path)[len(str(step_dir)) + 1:]
        raise CorruptCheckpointError(
            f"checkpoint {str(step_dir)!r}: {inside!r} is not valid JSON ({e})") from None


def _move_aside(workdir: pathlib.Path, step: int, folder: str) -> pathlib.Path:
  target_root = as_path(workdir) / folder
  target = target_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
  source = checkpoint_dir(workdir) / str(step)
  if is_url(source):
    # A bucket has no folders, so epath's rename (which wants the target's folder to exist)
    # fails: copy each object server-side, then delete the originals. epath's file-system
    # instance (the one orbax lists with) does it, so its listing cache stays true.
    store = epath_backend.fsspec_backend.fs(str(source))
    store.copy(str(source), str(target), recursive=True)
    store.rm(str(source), recursive=True)
  else:
    target_root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
  return target


def restore_checked(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                    abstract_opt_state: Any, data_iterator: Any) -> tuple[Any, Any, int]:
  """`restore`, turning any failure and any non-finite value into CorruptCheckpointError."""
  step_dir = as_path(manager.directory) / str(step)
  where = f"checkpoint {str(step_dir)!r}"
  _check_json_files(step_dir)
  try:
    params, opt_state, restored_step = restore(manager, step, abstract_params,
                                               abstract_opt_state, data_iterator)
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
    raise CorruptCheckpointError(f"{where} is unreadable ({_what_is_wrong(e)})") from e
  if restored_step != step:
    raise CorruptCheckpointError(f"{where}: its meta item says step {restored_step}")
  if not bool(all_finite((params, opt_state))):
    bad = first_non_finite(jax.device_get((params, opt_state)))
    raise CorruptCheckpointError(f"{where} holds NaN/Inf (first at {bad})")
  return params, opt_state, step


def restore_intact(workdir: str | pathlib.Path, manager: ocp.CheckpointManager,
                   abstract_params: Any, abstract_opt_state: Any, data_iterator: Any,
                   chosen_step: int | None = None) -> tuple[Any, Any, int] | None:
  """The newest intact checkpoint (or `chosen_step`), or None when there is none to resume.

  A checkpoint that fails to restore is named with what is wrong, moved to
  WORKDIR/checkpoints_corrupt/ (so the run can save that step again), and the next older one is
  tried, with a loud warning. With `chosen_step`, the checkpoints after it are moved to
  WORKDIR/checkpoints_superseded/: the run continues from the chosen step and will write those
  steps again.
  """
  workdir = as_path(workdir)
  present = sorted(manager.all_steps())
  if chosen_step is not None:
    if chosen_step not in present:
      raise CorruptCheckpointError(
          f"--restore_step {chosen_step}: no such checkpoint in "
          f"{str(checkpoint_dir(workdir))!r} (steps present: "
          f"{', '.join(map(str, present)) or 'none'})")
    restored = restore_checked(manager, chosen_step, abstract_params, abstract_opt_state,
                               data_iterator)
    for later in (s for s in present if s > chosen_step and jax.process_index() == 0):
      moved = _move_aside(workdir, later, SUPERSEDED_DIR)
      print(f"WARNING: restoring the chosen step {chosen_step}: checkpoint {later} moved to "
            f"{moved}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints after --restore_step moved aside")
    manager.reload()
    return restored
  for step in reversed(present):
    try:
      return restore_checked(manager, step, abstract_params, abstract_opt_state, data_iterator)
    except CorruptCheckpointError as e:
      if jax.process_count() > 1:
        # Each process restores its own data item; a fallback must be one step for all, and
        # moving folders is process 0's alone: let the user choose it.
        raise CorruptCheckpointError(
            f"{e}; with several processes choose an intact step with --restore_step "
            f"(steps present: {', '.join(map(str, present))})") from e
      moved = _move_aside(workdir, step, CORRUPT_DIR)
      older = [s for s in present if s < step]
      print(f"WARNING: {e}; moved it to {moved}; "
            + (f"falling back to step {older[-1]}" if older else "no intact checkpoint is "
               "left: training starts from step 0"), file=sys.stderr, flush=True)
      manager.reload()
  return None


def remove_stale_tmp(workdir: str | pathlib.Path) -> list[pathlib.Path]:
  """Deletes orbax tmp folders that a killed save left behind (call only holding the lock)."""
  root = checkpoint_dir(workdir)
  stale = sorted(p for p in root.glob(f"*{TMP_MARKER}*")) if root.is_dir() else []
  for path in stale:
    if is_url(path) and path.is_dir():
      path.rmtree()
    elif is_url(path):
      path.unlink()
    elif path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)
    print(f"removed {path}, left by a save that did not finish", flush=True)
  return stale


def make_best_manager(workdir: str | pathlib.Path) -> ocp.CheckpointManager:
  """WORKDIR/best: the parameters of the best epoch so far, and of the one before (save_best)."""
  return make_manager(as_path(workdir) / BEST_DIR, max_to_keep=2)


def save_best(manager: ocp.CheckpointManager, step: int, params: Any, epoch: int) -> None:
  """Saves a new best beside the previous one, deleting any older; waits, so a later kill
  finds it whole or not at all.

  The previous best stays until the next one: a run killed before this step's checkpoint
  resumes from the one before, drops this best (`drop_best_after`) and redoes its epoch, and
  if the redone epoch scores lower (nondeterministic kernels, an allowed lr change), the
  selection falls back to the previous best epoch, whose parameters must still be here.
  """
  kept = sorted(s for s in manager.all_steps() if s < step)[-1:]
  for old in manager.all_steps():
    if old not in kept:
      manager.delete(old)
  _saving[manager] = int(step)
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      meta=ocp.args.JsonSave({"step": int(step), "epoch": int(epoch),
                              "layout_version": LAYOUT_VERSION})), force=True)
  wait(manager)


def restore_best(manager: ocp.CheckpointManager, abstract_params: Any) -> tuple[Any, int]:
  """(params, step) of the best epoch."""
  step = manager.latest_step()
  if step is None:
    raise CorruptCheckpointError(f"{str(manager.directory)!r} holds no best checkpoint")
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  return restored["params"], step


def drop_best_after(manager: ocp.CheckpointManager, step: int) -> None:
  """A best saved after the checkpoint a run resumes from: its epoch is redone, so is it."""
  for stale in [s for s in manager.all_steps() if s > step]:
    manager.delete(stale)


def available_steps(workdir: str | pathlib.Path) -> list[int]:
  if not checkpoint_dir(workdir).is_dir():
    return []
  return sorted(make_manager(workdir, read_only=True).all_steps())


def restore_params(workdir: str | pathlib.Path, step: int | None = None) -> tuple[Any, int]:
  """The `params` item alone, as host numpy arrays: what export and extraction need.

  `step` None takes the latest checkpoint. Errors name the workdir and the steps present.
  """
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints under {str(checkpoint_dir(workdir))!r}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step {step}: not in {str(checkpoint_dir(workdir))!r} "
                     f"(steps present: {', '.join(map(str, steps))})")
  manager = make_manager(workdir, read_only=True)
  where = f"checkpoint {str(checkpoint_dir(workdir) / str(step))!r}"
  others = [s for s in steps if s != step]
  try:
    metadata = manager.item_metadata(step)["params"]
    # Restore every array onto this host's first device (export runs on one machine).
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))
    params = jax.tree.map(jax.device_get, restored["params"])
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
    raise CorruptCheckpointError(
        f"{where} is unreadable ({_what_is_wrong(e)}); pick another with --step "
        f"(others present: {', '.join(map(str, others)) or 'none'})") from e
  finally:
    manager.close()
  bad = first_non_finite(params)
  if bad is not None:
    # NaN weights would export and extract "successfully": refuse them here, for every reader.
    raise NonFiniteStateError(
        f"{where} holds NaN/Inf parameters (first at {bad}); refusing to use it; pick an "
        f"earlier one with --step (others present: {', '.join(map(str, others)) or 'none'})")
  return params, step
