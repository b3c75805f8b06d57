"""Fine-tuning results files, and the pre-training run (the table's method row) each came from.

A results.json (format `spcl_jax.finetune.results/1`, written by `python -m spcl_jax.finetune`)
names its pre-training run in `init.path`. The row it lands in is that run's label: the
pre-training workdir's folder name by default, or LABEL from `--name PATH=LABEL`. Results of
one pre-training run at different checkpoint steps get separate rows ("LABEL @ step S"), and so
do its classification results of another protocol or pooling ("LABEL [full, pool cls]", "LABEL
[linear, pool avg]"): full fine-tuning and linear evaluation, cls and avg, never share a cell.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from spcl_jax import accelerator_time
from spcl_jax.downstream import (CLASSIFICATION_PROTOCOLS, LABEL_FRACTIONS, PROTOCOLS, RESULTS_FILE,
                                 RESULTS_FORMAT, SELECTIONS, TASKS)

# A workdir's config.json (run_info.FILENAME), read as JSON: the report never imports the model.
CONFIG_FILE = "config.json"
VARIANT_SEPARATOR = "\x01"  # in a row key: LABEL[\0STEP][\x01VARIANT]


def find_results(run_dirs: Sequence[str]) -> list[pathlib.Path]:
  """results.json files: each argument is one, or a folder holding one, or a folder of runs.

  Folders are searched recursively, but not below a folder that has its own results.json: a
  multi-seed run's seed_*/results.json are already averaged into the run's own file.
  """
  found: list[pathlib.Path] = []
  for argument in run_dirs:
    path = pathlib.Path(argument).expanduser()
    if path.is_file():
      found.append(path)
    elif path.is_dir():
      runs = list(_runs_below(path))
      if not runs:
        print(f"report: no {RESULTS_FILE} in or below {argument}: its cells stay empty",
              file=sys.stderr)
      found.extend(runs)
    else:
      raise FileNotFoundError(f"{argument!r} does not exist")
  unique = list(dict.fromkeys(p.resolve() for p in found))
  return unique


def _runs_below(folder: pathlib.Path) -> Iterable[pathlib.Path]:
  if (folder / RESULTS_FILE).is_file():
    yield folder / RESULTS_FILE
    return
  for child in sorted(p for p in folder.iterdir() if p.is_dir()):
    yield from _runs_below(child)


def _require(condition: bool, path: pathlib.Path, message: str) -> None:
  if not condition:
    raise ValueError(f"{path}: {message}")


def load_result(path: pathlib.Path, selection: str = "best_val") -> dict[str, Any]:
  """The parsed file, after checking the fields the tables read (errors name file and field)."""
  try:
    result = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON ({e})") from e
  _require(isinstance(result, dict) and result.get("format") == RESULTS_FORMAT, path,
           f"'format' is {result.get('format') if isinstance(result, dict) else None!r}, "
           f"not {RESULTS_FORMAT!r}")
  _require(result.get("task") in TASKS, path, f"'task' {result.get('task')!r} is not one of {TASKS}")
  _require(result.get("protocol") in PROTOCOLS, path,
           f"'protocol' {result.get('protocol')!r} is not one of {PROTOCOLS}")
  _require(result.get("label_fraction") in LABEL_FRACTIONS, path,
           f"'label_fraction' {result.get('label_fraction')!r} is not one of {LABEL_FRACTIONS}")
  init = result.get("init")
  _require(isinstance(init, dict) and "kind" in init and "path" in init, path,
           "'init' needs 'kind' and 'path'")
  key = SELECTIONS[selection]
  _require(isinstance(result.get(key), dict), path, f"no {key!r}")
  return result


@dataclasses.dataclass(frozen=True)
class Method:
  """One row: a pre-trained encoder (or another initialisation) and what its run recorded."""

  label: str
  backbone: str = ""                       # e.g. ViT-B/16, from the pre-training config.json
  train_gflops_per_image: float | None = None
  view_forward_gflops: float | None = None
  accelerator_hours: float | None = None
  accelerators: str = ""                   # e.g. "8 x NVIDIA H200"


def pretraining_workdir(path: str | None) -> pathlib.Path | None:
  """The workdir (the folder with config.json) that `init.path` is or lies inside, if any."""
  if not path:
    return None
  path = pathlib.Path(path).expanduser()
  for folder in (path, *path.parents):
    if (folder / CONFIG_FILE).is_file():
      return folder.resolve()
  return None


def variant_label(result: dict[str, Any]) -> str:
  """'full, pool cls' / 'linear, pool avg' for a classification result; '' where the file
  names neither a linear protocol nor a pooling (older files), and for segmentation."""
  protocol = result["protocol"]
  if protocol not in CLASSIFICATION_PROTOCOLS:
    return ""
  model = result.get("config", {}).get("model", {})
  pool = result.get("pool") or (model.get("pool") if isinstance(model, dict) else None)
  if protocol == "classification" and not pool:
    return ""
  return ", ".join(["linear" if protocol == "linear" else "full",
                    *([f"pool {pool}"] if pool else [])])


def backbone_name(variant: str) -> str:
  return f"ViT-{variant}" if variant else ""


def describe_pretraining(workdir: pathlib.Path, label: str) -> Method:
  """GFLOPs as the run's config.json recorded them, hours from accelerator_time.json."""
  path = workdir / CONFIG_FILE
  try:
    info = json.loads(path.read_text())
    variant = info["model"]["variant"]
    flops = info.get("flops", {})
    if "spcl" not in info["config"]:
      raise KeyError("spcl")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a pre-training config.json ({e!r})") from e
  if "train_per_image" not in flops:
    print(f"report: {path} records no FLOPs (written before they were recorded): the GFLOPs "
          "cells of its row stay empty", file=sys.stderr)
  timing = accelerator_time.read_accelerator_time(workdir)
  hours = accelerators = None
  if timing is not None:
    hours = timing["accelerator_seconds"] / 3600
    accelerators = " + ".join(dict.fromkeys(
        f"{s['num_devices']} x {s['device_kind']}" for s in timing["sessions"]))
  return Method(label=label, backbone=backbone_name(variant),
                train_gflops_per_image=_giga(flops.get("train_per_image")),
                view_forward_gflops=_giga(flops.get("view_forward")),
                accelerator_hours=hours, accelerators=accelerators or "")


def _giga(flops: float | None) -> float | None:
  return None if flops is None else flops / 1e9


def parse_names(pairs: Sequence[str]) -> dict[pathlib.Path, str]:
  """--name PATH=LABEL (PATH: a pre-training workdir or init checkpoint) -> {resolved: label}."""
  names = {}
  for pair in pairs:
    path, sep, label = pair.rpartition("=")
    if not sep or not path or not label.strip():
      raise ValueError(f"--name {pair!r}: expected PATH=LABEL")
    names[pathlib.Path(path).expanduser().resolve()] = label.strip()
  return names


class MethodNamer:
  """Gives each result its row key, reading each pre-training workdir once.

  The key is the row's label, plus the pre-training step when the result names one (see
  `final_labels`); `methods` maps each key to what its pre-training run recorded.
  """

  def __init__(self, names: dict[pathlib.Path, str]):
    self.names = names
    self.methods: dict[str, Method] = {}
    self._sources: dict[str, pathlib.Path | None] = {}  # label -> the run it names

  def row_of(self, result: dict[str, Any]) -> str:
    init = result["init"]
    workdir = pretraining_workdir(init["path"])
    candidates = [workdir] if workdir is not None else []
    if init["path"]:
      candidates.append(pathlib.Path(init["path"]).expanduser().resolve())
    label = next((self.names[c] for c in candidates if c in self.names), None)
    if label is None:
      label = self._default_label(init, workdir)
    source = candidates[0] if candidates else None
    if self._sources.setdefault(label, source) != source:
      raise ValueError(f"two initialisations are both named {label!r}: "
                       f"{self._sources[label]} and {source}; tell them apart with "
                       "--name PATH=LABEL")
    key = label
    if init.get("step") is not None and workdir is not None:
      key = f"{label}\0{init['step']}"
    variant = variant_label(result)
    if variant:
      key += VARIANT_SEPARATOR + variant
    if key not in self.methods:
      self.methods[key] = (describe_pretraining(workdir, label) if workdir is not None
                           else Method(label=label, backbone=self._backbone(result)))
    return key

  @staticmethod
  def _default_label(init: dict[str, Any], workdir: pathlib.Path | None) -> str:
    if workdir is not None:
      return workdir.name
    if init["path"]:
      return f"{init['kind']}: {pathlib.Path(init['path']).name}"
    return f"{init['kind']} init"

  @staticmethod
  def _backbone(result: dict[str, Any]) -> str:
    model = result.get("config", {}).get("model", {})
    return backbone_name(model.get("variant", "")) if isinstance(model, dict) else ""


def final_labels(methods: dict[str, Method]) -> dict[str, str]:
  """Internal key -> the row label; '@ step S' only where one label has several steps; the
  protocol and pooling in brackets where the results name them."""
  def parts(key: str) -> tuple[str, str | None, str]:
    base, _, variant = key.partition(VARIANT_SEPARATOR)
    label, _, step = base.partition("\0")
    return label, step or None, variant
  steps_of: dict[str, set[str | None]] = {}
  for key in methods:
    label, step, _ = parts(key)
    steps_of.setdefault(label, set()).add(step)
  shown = {}
  for key in methods:
    label, step, variant = parts(key)
    text = f"{label} @ step {step}" if len(steps_of[label]) > 1 and step is not None else label
    shown[key] = f"{text} [{variant}]" if variant else text
  return shown
