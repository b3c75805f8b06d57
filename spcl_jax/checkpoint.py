"""Checkpoints in WORKDIR/checkpoints, one orbax step folder per save, four separate items:

  params     {'encoder': ViT params (big_vision names), 'log_scale': scalar}
  opt_state  the optax state
  data       the grain iterator state, one JSON file per process (grain's own handler)
  meta       {'step': int, 'layout_version': int}

Separate items let export and feature extraction restore `params` alone, without building the
optimizer or the input pipeline.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

LAYOUT_VERSION = 1
ITEM_NAMES = ("params", "opt_state", "data", "meta")


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser().resolve() / "checkpoints"


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
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave({"step": int(step), "layout_version": LAYOUT_VERSION})),
      force=True)


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
  metadata = manager.item_metadata(step)["params"]
  # Restore every array onto this host's first device (export runs on one machine).
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract)))
  params = jax.tree.map(jax.device_get, restored["params"])
  manager.close()
  return params, step
