"""WORKDIR/config.json and WORKDIR/history.jsonl: what a run was and how it was (re)started.

config.json records the original resolved config, the model's shape, the image preprocessing and
normalisation, the checkpoint layout version and the analytic FLOPs per image (`flops`, which
the report reads), so export, extraction and the report need nothing but the workdir. It is written once, at the first start, and never rewritten.

history.jsonl gets one line per start: time, host, PID, the step it starts from, the full
config, and the fields that changed since the previous start (with the overrides that allowed
them). A resume may change only its workload's free fields (`ResumeRules`: PRETRAINING's FREE
below, FINETUNING's); a locked field (one that changes what is being trained) needs an explicit
`--allow_config_change=FIELD`, which is recorded. A changed model
shape, image size, preprocessing or normalisation is refused always: the checkpoint would not
load, or config.json would describe the exports wrongly.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import socket
from collections.abc import Sequence
from typing import Any

import ml_collections

import spcl_jax
from spcl_jax.checkpoint import LAYOUT_VERSION
from spcl_jax.metrics import flops_record
from spcl_jax.errors import ConfigError
from spcl_jax.models.vit import variant_dims
from spcl_jax.workdir_path import append_line, as_path, rewrite_text

FILENAME = "config.json"
HISTORY_FILENAME = "history.jsonl"

# Every config field, by what a resume may do with it. A field or prefix ('optim.') matches
# itself and what is under it; a field in neither table is LOCKED (the safe default).
LOCKED = ("seed", "model.", "spcl.", "batch_size", "batch_size_per_device", "grad_accum_steps",
          "accumulation", "optim.",
          "data.source", "data.mean", "data.std", "data.resize_filter", "data.shuffle_seed")
FREE = ("total_steps", "log_every_steps",
        "checkpoint_every_steps", "max_checkpoints_to_keep", "model.remat",
        "model.attention_impl", "model.attention_seq_multiple", "data.num_workers", "data.read_threads",
        "data.prefetch_buffer_size", "sharding.", "peak_flops_per_device",
        "evals.")  # evaluators read the state, never change it
# Free, but the learning-rate schedule is a function of it: say so.
FREE_WITH_WARNING = {"total_steps": "the learning-rate schedule (warmup, cosine decay) is "
                                    "computed from total_steps, so it changes from here on"}


# Fine-tuning: what a resume may change without changing what is trained or scored. Everything
# else (epochs, the lr schedule, the init, the splits, bootstrap_samples...) is locked.
FINETUNE_FREE = ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
                 "model.remat", "model.attention_impl", "model.attention_seq_multiple",
                 "data.num_workers", "data.read_threads", "data.prefetch_buffer_size",
                 "sharding.", "peak_flops_per_device")


@dataclasses.dataclass(frozen=True)
class ResumeRules:
  """The config fields a workload's resume may change freely, and warnings for some of them."""

  free: tuple[str, ...]
  free_with_warning: dict[str, str] = dataclasses.field(default_factory=dict)

  def is_free(self, field: str) -> bool:
    return any(_matches(field, entry) for entry in self.free)


PRETRAINING = ResumeRules(FREE, FREE_WITH_WARNING)
FINETUNING = ResumeRules(FINETUNE_FREE)


class LockedFieldChangedError(ConfigError):
  """A resume changes a field that decides what is trained, without an explicit override."""


def _matches(field: str, entry: str) -> bool:
  return field == entry or (entry.endswith(".") and field.startswith(entry))


def is_free(field: str) -> bool:
  """Pre-training's rule: FREE wins over LOCKED for the exceptions inside a locked section
  (model.remat)."""
  return PRETRAINING.is_free(field)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def describe_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  model = dict(variant=config.model.variant, image_size=config.model.image_size,
               channels=config.model.channels, **variant_dims(config.model.variant))
  return {
      "layout_version": LAYOUT_VERSION,
      "spcl_jax_version": spcl_jax.__version__,
      "model": model,
      "preprocessing": {
          "image_size": config.model.image_size,
          "grayscale": True,
          "resize": "direct (no crop)",
          "resize_filter": config.data.resize_filter,
          "intensity": "decoded to [0, 1], stored as uint8; x = (u8 / 255 - mean) / std",
      },
      "normalization": {"mean": config.data.mean, "std": config.data.std},
      "flops": flops_record(config),
      "config": json.loads(config.to_json_best_effort()),
  }


def read_run_info(workdir: str | pathlib.Path) -> dict[str, Any]:
  path = as_path(workdir) / FILENAME
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} not found: is {str(workdir)!r} an spcl-jax workdir?")
  try:
    info = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{str(path)!r} is not valid JSON ({e}); it may have been cut short: "
                     "restore it from a copy") from None
  if info.get("layout_version") != LAYOUT_VERSION:
    raise ValueError(f"{str(path)!r}: layout_version {info.get('layout_version')} is not "
                     f"{LAYOUT_VERSION}, the one this code reads")
  return info


def write_run_info(workdir: str | pathlib.Path, config: ml_collections.ConfigDict,
                   extra: dict[str, Any] | None = None) -> None:
  """Writes config.json at the first start; on a resume checks it describes the same model.

  `extra`: what a workload adds (a fine-tuning run's classifier or segmenter). An existing
  config.json is never rewritten: it stays the original (history.jsonl has the rest).
  """
  path = as_path(workdir) / FILENAME
  new = {**describe_run(config), **(extra or {})}
  if path.is_file():
    old = read_run_info(workdir)
    for key in ("model", "preprocessing", "normalization"):
      if old[key] != new[key]:
        raise ConfigError(
            f"{str(path)!r}: this workdir was started with {key} {old[key]}, the config now "
            f"gives {new[key]}; resume with the original settings or use a new --workdir")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  rewrite_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def read_history(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The starts recorded so far (a line cut short by a kill is skipped)."""
  path = as_path(workdir) / HISTORY_FILENAME
  if not path.is_file():
    return []
  entries = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      entries.append(json.loads(line))
    except ValueError:
      continue
  return entries


def _previous_config(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The config of the last start (history), else the original (config.json), else None."""
  history = read_history(workdir)
  if history:
    return history[-1]["config"]
  if (workdir / FILENAME).is_file():
    return read_run_info(workdir)["config"]
  return None


def check_resume(workdir: str | pathlib.Path, config: ml_collections.ConfigDict,
                 allowed: Sequence[str] = (), rules: ResumeRules = PRETRAINING
                 ) -> list[dict[str, Any]]:
  """The fields changed since the previous start; raises for a locked one not in `allowed`.

  Changes nothing on disk (it runs before the workdir is written). Also checks config.json
  describes the same model (`write_run_info`'s rule) and that `allowed` names real fields.
  """
  workdir = as_path(workdir)
  new = flatten(json.loads(config.to_json_best_effort()))
  for field in allowed:
    if not any(_matches(f, field) for f in new):
      raise ConfigError(f"--allow_config_change={field}: no such config field")
  previous = _previous_config(workdir)
  if previous is None:
    return []
  if (workdir / FILENAME).is_file():
    old_info, new_info = read_run_info(workdir), describe_run(config)
    for key in ("model", "preprocessing", "normalization"):
      if old_info[key] != new_info[key]:
        raise ConfigError(
            f"{str(workdir / FILENAME)!r}: this workdir was started with {key} {old_info[key]}, "
            f"the config now gives {new_info[key]}; this cannot be overridden (the checkpoint "
            "and the exports depend on it): resume with the original settings or use a new "
            "--workdir")
  old = flatten(previous)
  changes = []
  for field in sorted(old.keys() | new.keys()):
    if old.get(field) == new.get(field):
      continue
    change = {"field": field, "old": old.get(field), "new": new.get(field)}
    if not rules.is_free(field):
      if not any(_matches(field, entry) for entry in allowed):
        raise LockedFieldChangedError(
            f"config.{field}={new.get(field)!r}: this workdir's run has {old.get(field)!r}, and "
            f"{field} decides what is trained; resume with the original value, use a new "
            f"--workdir, or pass --allow_config_change={field} to change it on purpose "
            "(recorded in history.jsonl)")
      change["overridden"] = True
    changes.append(change)
  return changes


def record_start(workdir: str | pathlib.Path, config: ml_collections.ConfigDict,
                 start_step: int, changes: Sequence[dict[str, Any]],
                 restored_from: int | None, *, rules: ResumeRules = PRETRAINING,
                 extra_info: dict[str, Any] | None = None) -> None:
  """Writes config.json at the first start and appends this start to history.jsonl."""
  workdir = as_path(workdir)
  write_run_info(workdir, config, extra_info)
  for change in changes:
    note = rules.free_with_warning.get(change["field"])
    if note:
      print(f"WARNING: config.{change['field']} changed from {change['old']} to "
            f"{change['new']} on resume: {note}", flush=True)
  entry = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": socket.gethostname(), "pid": os.getpid(), "start_step": int(start_step),
      "restored_from": restored_from, "spcl_jax_version": spcl_jax.__version__,
      "changes": list(changes), "config": json.loads(config.to_json_best_effort()),
  }
  append_line(workdir / HISTORY_FILENAME, json.dumps(entry, sort_keys=True))
